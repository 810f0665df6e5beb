"""Cheap previews of a run in progress: latents → RGB with a fixed linear map, no VAE decode.

Each latent channel contributes a fixed amount to R, G and B (factors fitted on decoded images by the community, and
good enough to show composition and colour while a job runs). A 512² SD image has 64² latents, so the preview is a
64² JPEG of a few kilobytes: cheap to compute every few steps and to ship in an event. A tiny autoencoder decodes
sharper ones where one is configured (`gpu.preview_decoders`, engines/preview_decoder.py); this is the fallback.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

# rows: latent channels; columns: R, G, B
_SD1_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)


def latents_to_jpeg(latents: Any, arch: str = "sd1", quality: int = 70) -> bytes:
    """The first image of a latent batch (N, 4, h, w) as JPEG bytes."""
    import torch

    factors = torch.tensor(_SDXL_FACTORS if arch == "sdxl" else _SD1_FACTORS, dtype=torch.float32)
    first = latents[0].detach().to("cpu", torch.float32)
    if first.shape[0] != factors.shape[0]:  # not a 4-channel SD latent: show the first three channels
        rgb = first[:3].permute(1, 2, 0)
    else:
        rgb = torch.einsum("chw,cr->hwr", first, factors)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()
