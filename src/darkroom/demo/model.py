"""The demo model's parts, in Stable Diffusion 1.x's diffusers layout, so it loads like any SD 1.5 checkpoint.

Why these sizes: the model must train from scratch in well under an hour on two CPU cores and still follow its
captions. The world (`darkroom.demo.world`) has 64x64 pictures of flat colour, so:

- The VAE has three blocks (latents are 1/4 of the side: 16x16x4). Its latent space is fixed rather than learnt: the
  first three channels are the picture's 4x4 block means (RGB in [-1, 1]), the fourth is zero (`image_to_latents`).
  The UNet can therefore train from the first step without waiting for an autoencoder, the decoder only learns to
  sharpen a 16x16 thumbnail back to 64x64, and the encoder (used by img2img and inpainting) learns to take block means.
- The tokenizer is CLIP's BPE with one token per caption word (its merges spell each word out), plus every byte
  character, so unknown words still tokenize; it pads to 77 tokens like SD's.
- The text encoder is a two-layer CLIPTextModel of width 64; the UNet has three levels (32, 64, 128 channels) with
  cross-attention at 8x8, 4x4 and in the middle block, enough to place a shape and bind its colour.
- The noise schedule is SD 1.5's (scaled-linear betas) with v-prediction, so every sampler darkroom maps works.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from darkroom.demo.world import vocabulary
from darkroom.models.smoke import BOS_TOKEN, EOS_TOKEN, MAX_TOKENS, SD15_SCHEDULER_CONFIG, _bytes_to_unicode

LATENT_SCALE = 4  # pixels per latent cell along a side
# SD 1.5's schedule with v-prediction (as SD 2 uses): at high noise the UNet predicts the picture itself, so the
# background colour, decided in the first steps, is learnt directly rather than read off a noise estimate whose error
# is multiplied fifteenfold at t = 999 (with epsilon prediction the backgrounds came out washed towards grey).
SCHEDULER_CONFIG: dict[str, Any] = {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
TEXT_WIDTH = 64
UNET_CHANNELS = (32, 64, 128)
VAE_CHANNELS = (16, 32, 32)


def tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout (byte characters, the same with `</w>`, merge results, specials) and merges that
    spell every caption word out left to right, so each word is one token.

    BPE applies the lowest-ranked pair first, so one word's merge can cut into another word (`r e` inside `green`);
    such a word gets the merges that join the pieces it actually ends with, appended last: a merge ranked after
    all others never changes how an already whole word is split."""
    chars = list(_bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for word in vocabulary():
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    for word in vocabulary():
        pieces = bpe(word, merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = bpe(word, merges)
    tokens = chars + [c + "</w>" for c in chars]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE on one lowercase word (the same loop as `CLIPTokenizer.bpe`)."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def build_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    with tempfile.TemporaryDirectory(prefix="darkroom-demo-tok-") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        lines = "\n".join(f"{a} {b}" for a, b in merges)
        (folder / "merges.txt").write_text(f"#version: 0.2\n{lines}\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=MAX_TOKENS)


def build_text_encoder(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH * 2,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(channels: tuple[int, ...] = UNET_CHANNELS) -> Any:
    """Attention below the top level only: at 16x16 it would cost twice the rest of the network on a CPU."""
    from diffusers import UNet2DConditionModel

    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_vae(channels: tuple[int, ...] = VAE_CHANNELS) -> Any:
    """Three blocks: a latent cell is 4x4 pixels. `scaling_factor` 1: the latents already lie in [-1, 1]."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,
        mid_block_add_attention=False,
    )


def build_scheduler() -> Any:
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(SCHEDULER_CONFIG)


def image_to_latents(images: Any) -> Any:
    """The fixed latent space: 4x4 block means of images in [-1, 1] (N, 3, 64, 64) and a zero fourth channel."""
    import torch
    import torch.nn.functional as F

    means = F.avg_pool2d(images, LATENT_SCALE)
    return torch.cat([means, torch.zeros_like(means[:, :1])], dim=1)


def assemble(tokenizer: Any, text_encoder: Any, unet: Any, vae: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
