"""Training the demo model from scratch: deterministic, resumable, on a CPU in well under an hour.

Two phases, one checkpoint file. The VAE phase teaches the decoder to turn the fixed 16x16 latents (block means, see
`darkroom.demo.model`) back into sharp 64x64 pictures, with a little noise on its input so that a UNet's slightly
off latents still decode to flat colour, and teaches the encoder to produce those latents. The UNet phase trains the
text encoder and the UNet together on the same latents with SD's noise schedule and v-prediction.

Choices that buy accuracy per CPU second, since the budget is small:
- Every batch is drawn fresh from the world with a generator seeded by (seed, phase, step), so a resumed run sees
  exactly the batches an uninterrupted one would, and no data set is stored.
- Offset noise (a per-channel constant added to the noise) keeps the model from reading the background colour off
  the noise's mean, which pure noise at sampling time does not have: black and white backgrounds come out right.
- Min-SNR loss weighting (gamma 5) and an exponential moving average of the weights, which is what is exported.
- One in ten captions is dropped, so classifier-free guidance has an unconditional model to push away from.
- From UNet step `placed_from` on, a quarter of each batch is one shape at a named position: by then colours and
  backgrounds are learnt, and position, which the UNet can only infer from its borders, needs the most examples.
- One thread by default: on a busy two-core machine a second thread mostly waits for the first.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from darkroom.demo import model as parts
from darkroom.demo.world import Scene

Progress = Callable[[str, int, int, float], None]  # phase, step done, phase total, loss


@dataclass
class TrainConfig:
    steps: int = 1800  # UNet steps
    vae_steps: int = 400
    batch: int = 32
    vae_batch: int = 16
    lr: float = 1e-3
    vae_lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    caption_dropout: float = 0.1
    placed_from: int = 1800  # from this UNet step on, `placed_share` of each batch is one shape at a named position
    placed_share: float = 0.25
    offset_noise: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    latent_noise: float = 0.05  # on the decoder's input in the VAE phase
    checkpoint_every: int = 100
    threads: int = 1
    unet_channels: tuple[int, ...] = parts.UNET_CHANNELS
    vae_channels: tuple[int, ...] = parts.VAE_CHANNELS
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Holds the modules, optimisers and the EMA; `run` trains to the configured steps and `export` saves."""

    def __init__(self, config: TrainConfig, work: Path, device: str | None = None) -> None:
        import torch

        self.torch = torch
        self.config = config
        self.work = work
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.tokenizer = parts.build_tokenizer()
        self.text_encoder = parts.build_text_encoder(self.tokenizer).to(self.device)
        self.unet = parts.build_unet(config.unet_channels).to(self.device)
        self.vae = parts.build_vae(config.vae_channels).to(self.device)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
        self.unet_params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.opt = torch.optim.AdamW(self.unet_params, lr=config.lr, weight_decay=0.01)
        self.ema = [p.detach().clone() for p in self.unet_params]
        self.vae_step = 0
        self.unet_step = 0
        from diffusers import DDPMScheduler

        noise_schedule = DDPMScheduler.from_config(parts.SCHEDULER_CONFIG)
        self.alphas_cumprod = noise_schedule.alphas_cumprod.to(self.device)
        self.noise_schedule = noise_schedule

    # --- checkpoints --------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.work / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(self.config),
            "vae_step": self.vae_step,
            "unet_step": self.unet_step,
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "vae": self.vae.state_dict(),
            "opt": self.opt.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "ema": self.ema,
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        self.torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)  # a run killed mid-save keeps the previous checkpoint

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = self.torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.vae.load_state_dict(state["vae"])
        self.opt.load_state_dict(state["opt"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        for mine, saved in zip(self.ema, state["ema"], strict=True):
            mine.copy_(saved)
        self.vae_step, self.unet_step = state["vae_step"], state["unet_step"]
        return True

    # --- data ---------------------------------------------------------------------------------------------------

    def batch(self, phase: str, step: int, size: int) -> tuple[Any, list[str]]:
        """Pictures in [-1, 1] (N, 3, 64, 64) and their captions, a pure function of (seed, phase, step)."""
        import numpy as np

        cfg = self.config
        rng = random.Random(f"{cfg.seed}:{phase}:{step}")
        if phase == "unet" and step >= cfg.placed_from:
            scenes = [Scene.sample(rng, placed=rng.random() < cfg.placed_share) for _ in range(size)]
        else:  # the same draws as before `placed_from` existed, so a run resumed past it continues the same batches
            scenes = [Scene.sample(rng) for _ in range(size)]
        pixels = np.stack([np.asarray(s.render(), dtype=np.float32) for s in scenes])
        images = self.torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
        return images.to(self.device), [s.caption for s in scenes]

    def generator(self, phase: str, step: int) -> Any:
        seed = (self.config.seed * 1_000_003 + step) * 2 + (phase == "unet")
        return self.torch.Generator(self.device).manual_seed(seed)

    # --- phases -------------------------------------------------------------------------------------------------

    def run(self, progress: Progress | None = None) -> None:
        cfg = self.config
        while self.vae_step < cfg.vae_steps:
            loss = self.vae_train_step()
            self.vae_step += 1
            self._after_step("vae", self.vae_step, cfg.vae_steps, loss, progress)
        while self.unet_step < cfg.steps:
            loss = self.unet_train_step()
            self.unet_step += 1
            self._after_step("unet", self.unet_step, cfg.steps, loss, progress)

    def _after_step(self, phase: str, step: int, total: int, loss: float, progress: Progress | None) -> None:
        if step % self.config.checkpoint_every == 0 or step == total:
            self.save_checkpoint()
        if progress is not None:
            progress(phase, step, total, loss)

    def vae_train_step(self) -> float:
        torch = self.torch
        images, _ = self.batch("vae", self.vae_step, self.config.vae_batch)
        target = parts.image_to_latents(images)
        gen = self.generator("vae", self.vae_step)
        posterior = self.vae.encode(images).latent_dist
        encoder_loss = torch.nn.functional.mse_loss(posterior.mean, target)
        encoder_loss = encoder_loss + 1e-3 * (posterior.logvar + 10).pow(2).mean()  # a narrow posterior: std ~0.007
        noisy = target + self.config.latent_noise * torch.randn(target.shape, generator=gen, device=self.device)
        decoded = self.vae.decode(noisy).sample
        decoder_loss = torch.nn.functional.mse_loss(decoded, images)
        loss = encoder_loss + decoder_loss
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        return float(decoder_loss.detach())

    def unet_train_step(self) -> float:
        torch, cfg = self.torch, self.config
        for group in self.opt.param_groups:
            group["lr"] = self.learning_rate(self.unet_step)
        images, captions = self.batch("unet", self.unet_step, cfg.batch)
        gen = self.generator("unet", self.unet_step)
        keep = torch.rand(len(captions), generator=gen, device=self.device) >= cfg.caption_dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        latents = parts.image_to_latents(images)
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        noise = noise + cfg.offset_noise * torch.randn((n, latents.shape[1], 1, 1), generator=gen, device=self.device)
        t = torch.randint(0, len(self.alphas_cumprod), (n,), generator=gen, device=self.device)
        noisy = self.noise_schedule.add_noise(latents, noise, t)
        context = self.text_encoder(ids)[0]
        pred = self.unet(noisy, t, context).sample
        abar = self.alphas_cumprod[t]
        snr = abar / (1 - abar)
        weight = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1)  # min-SNR for a v target
        target = self.noise_schedule.get_velocity(latents, noise, t)
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet_params, 1.0)
        self.opt.step()
        self._update_ema()
        return float(loss.detach())

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then a cosine down to a tenth."""
        cfg = self.config
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.unet_step) / (10 + self.unet_step))
        with self.torch.no_grad():
            for average, param in zip(self.ema, self.unet_params, strict=True):
                average.lerp_(param.detach(), 1 - decay)

    # --- export -------------------------------------------------------------------------------------------------

    def export(self, out: Path, card: dict[str, Any] | None = None) -> Path:
        """The EMA weights as an SD 1.x diffusers folder in float16 (half the bytes; loads as any dtype)."""
        import copy
        import json

        torch = self.torch
        unet, text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        with torch.no_grad():
            for param, average in zip([*unet.parameters(), *text_encoder.parameters()], self.ema, strict=True):
                param.copy_(average)
        pipe = parts.assemble(self.tokenizer, text_encoder, unet, copy.deepcopy(self.vae))
        pipe.to("cpu", torch.float16)
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out, safe_serialization=True)
        if card is not None:
            (out / "darkroom.json").write_text(json.dumps(card, indent=2) + "\n")
        return out
