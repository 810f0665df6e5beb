"""The smoke-test model: a tiny random-weight Stable Diffusion pipeline built entirely offline.

A fresh install has no checkpoint, and real weights cannot be fetched for it (no hub access is assumed anywhere).
Rather than refusing every request, darkroom builds this pipeline so that the whole path (API, queue, worker, engine,
storage) can be exercised at once; its pictures are noise-like. Tests build the same thing, so they cover the real
diffusers code paths in well under a second per image.

Shapes follow SD 1.5 where it matters to callers: a 4-channel latent, a VAE with four blocks (scale factor 8), the
SD 1.5 noise schedule and a CLIP-style BPE tokenizer padding to 77 tokens. Everything else is as small as it can be.
Importing this module is cheap; torch, diffusers and transformers are imported only when a pipeline is built.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkroom.models.offline import enforce_offline

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

SMOKE_MODEL_DIRNAME = "darkroom-smoke-test"
SMOKE_LABEL: dict[str, Any] = {
    "smoke_test": True,
    "description": (
        "Random weights made by darkroom to check the plumbing; images are noise-like. Add real checkpoints with "
        "`darkroom models add PATH` or drop .safetensors files / diffusers folders into the models dir."
    ),
}

# SD 1.5's scheduler config (PNDM, scaled-linear betas), so sampler overrides are exercised against the real values.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENS = 77
# A handful of merges so the BPE model is exercised beyond single characters; words are lowercased by the tokenizer.
TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("o", "n</w>"),
    ("e", "r"),
    ("c", "a"),
    ("ca", "t</w>"),
    ("o", "f</w>"),
)


def ensure_smoke_model(models_dir: Path) -> Path | None:
    """Build the smoke model if the models dir holds no model at all; returns its path, or None if nothing was needed.

    Written to a hidden temporary folder first and renamed into place, so a concurrent scan never sees half of it.
    """
    from darkroom.models.registry import ModelRegistry

    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / SMOKE_MODEL_DIRNAME
    if target.exists() or ModelRegistry.has_models(models_dir):
        return None
    log.warning("no models in %s: building the random-weight smoke-test model %s", models_dir, SMOKE_MODEL_DIRNAME)
    tmp = Path(tempfile.mkdtemp(prefix=".smoke-", dir=models_dir))
    try:
        save_smoke_model(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_smoke_model(folder: Path, seed: int = 0) -> Path:
    """Save the tiny pipeline as a labelled diffusers folder."""
    pipe = build_tiny_pipeline(seed=seed)
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]  # a DiffusionPipeline method
    (folder / "darkroom.json").write_text(json.dumps(SMOKE_LABEL, indent=2) + "\n")
    return folder


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A complete SD-1-shaped pipeline with deterministic random weights (same seed, same tensors)."""
    enforce_offline()
    from diffusers import StableDiffusionPipeline

    tokenizer = build_tiny_tokenizer()
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        unet=tiny_unet(seed),
        scheduler=_sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_tokenizer() -> Any:
    """A CLIP BPE tokenizer from a vocabulary written here: every byte-level character (bare and word-final) plus a
    few merges. Going through files keeps this working with both the old and the new transformers constructors."""
    enforce_offline()
    from transformers import CLIPTokenizer

    vocab = tiny_vocab()
    with tempfile.TemporaryDirectory(prefix="darkroom-tok-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        merges = "\n".join(f"{a} {b}" for a, b in TINY_MERGES)
        (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=MAX_TOKENS)


def tiny_vocab() -> dict[str, int]:
    """CLIP's vocabulary layout: byte characters, the same with `</w>`, merge results, then the special tokens."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in TINY_MERGES] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table (a fixed, published mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _sd15_scheduler() -> Any:
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)


def tiny_unet(seed: int) -> Any:
    """Attention only at the lower resolution keeps a 512x512 request cheap (1024 tokens, not 4096)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae(seed: int) -> Any:
    """Four blocks, like SD's VAE, so that latents are 1/8 of the image side; channels are tiny."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.18215,
    )


def tiny_text_encoder(seed: int, tokenizer: Any) -> Any:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 2)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()
