"""`darkroom demo train`: train the built-in demo model from scratch (docs/demo-model.md).

Kept apart from cli.py so that the command line's other commands never import torch; training imports it only when
it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

demo_app = typer.Typer(help="The built-in demo model (flat coloured shapes).", no_args_is_help=True)
console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.add_typer(demo_app, name="demo")


@demo_app.command("train")
def train(
    out: Annotated[Path, typer.Option(help="where to write the diffusers folder")] = Path("darkroom-demo"),
    work: Annotated[Path, typer.Option(help="checkpoints (resume from here)")] = Path("darkroom-demo-train"),
    steps: Annotated[int, typer.Option(min=0, help="UNet training steps")] = 1800,
    vae_steps: Annotated[int, typer.Option(min=0, help="VAE training steps")] = 300,
    batch: Annotated[int, typer.Option(min=1, help="pictures per UNet step")] = 32,
    vae_batch: Annotated[int, typer.Option(min=1, help="pictures per VAE step")] = 16,
    seed: Annotated[int, typer.Option(help="the same seed and steps give the same weights")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads (1 is fastest on a busy machine)")] = 1,
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda when present)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the checkpoint in --work")] = False,
) -> None:
    """Train the demo model: deterministic (seeded), resumable (--resume), CUDA when present."""
    from darkroom.demo.install import model_card
    from darkroom.demo.train import TrainConfig, Trainer
    from darkroom.extras import require_worker

    require_worker()
    config = TrainConfig(steps=steps, vae_steps=vae_steps, batch=batch, vae_batch=vae_batch, seed=seed, threads=threads)
    trainer = Trainer(config, work, device=device)
    if resume and trainer.load_checkpoint():
        console.print(f"resumed at VAE step {trainer.vae_step}, UNet step {trainer.unet_step}")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        tasks = {
            "vae": bar.add_task("VAE", total=vae_steps, completed=trainer.vae_step, loss=0.0),
            "unet": bar.add_task("UNet", total=steps, completed=trainer.unet_step, loss=0.0),
        }
        trainer.run(lambda phase, step, _total, loss: bar.update(tasks[phase], completed=step, loss=loss))
    trainer.export(out, model_card())
    console.print(f"wrote {out}")
