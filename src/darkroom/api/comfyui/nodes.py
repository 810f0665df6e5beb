"""`GET /object_info`: the node classes darkroom compiles, in ComfyUI's shape, with the choices this server has
(checkpoints, LoRAs, upscale models, ControlNets, uploaded inputs, samplers). Front ends and clients build their
forms and validate workflows from it, so it lists exactly what `compile.py` accepts."""

from __future__ import annotations

from typing import Any

from .compile import LATENT_METHODS, PIXEL_METHODS, SAMPLERS, SCHEDULERS

INT = "INT"
FLOAT = "FLOAT"


def _int(default: int, lo: int, hi: int, step: int = 1) -> list[Any]:
    return [INT, {"default": default, "min": lo, "max": hi, "step": step}]


def _float(default: float, lo: float, hi: float, step: float = 0.01) -> list[Any]:
    return [FLOAT, {"default": default, "min": lo, "max": hi, "step": step}]


def _text() -> list[Any]:
    return ["STRING", {"multiline": True}]


def definitions(choices: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Each supported class: (category, required inputs, outputs with names, whether it is an output node)."""
    samplers, schedulers = list(SAMPLERS), list(SCHEDULERS)
    seed = _int(0, 0, 2**64 - 1)
    sampling = {
        "model": ["MODEL"],
        "positive": ["CONDITIONING"],
        "negative": ["CONDITIONING"],
        "latent_image": ["LATENT"],
    }
    table: dict[str, tuple[str, dict[str, Any], list[tuple[str, str]], bool]] = {
        "CheckpointLoaderSimple": (
            "loaders",
            {"ckpt_name": [choices["checkpoints"]]},
            [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
            False,
        ),
        "CLIPTextEncode": (
            "conditioning",
            {"text": _text(), "clip": ["CLIP"]},
            [("CONDITIONING", "CONDITIONING")],
            False,
        ),
        "CLIPSetLastLayer": (
            "conditioning",
            {"clip": ["CLIP"], "stop_at_clip_layer": _int(-1, -1, -1)},
            [("CLIP", "CLIP")],
            False,
        ),
        "EmptyLatentImage": (
            "latent",
            {"width": _int(512, 64, 16384, 8), "height": _int(512, 64, 16384, 8), "batch_size": _int(1, 1, 4096)},
            [("LATENT", "LATENT")],
            False,
        ),
        "KSampler": (
            "sampling",
            {
                "model": ["MODEL"],
                "seed": seed,
                "steps": _int(20, 1, 10000),
                "cfg": _float(8.0, 0.0, 100.0, 0.1),
                "sampler_name": [samplers],
                "scheduler": [schedulers],
                **{k: v for k, v in sampling.items() if k != "model"},
                "denoise": _float(1.0, 0.0, 1.0),
            },
            [("LATENT", "LATENT")],
            False,
        ),
        "KSamplerAdvanced": (
            "sampling",
            {
                "model": ["MODEL"],
                "add_noise": [["enable"]],
                "noise_seed": seed,
                "steps": _int(20, 1, 10000),
                "cfg": _float(8.0, 0.0, 100.0, 0.1),
                "sampler_name": [samplers],
                "scheduler": [schedulers],
                **{k: v for k, v in sampling.items() if k != "model"},
                "start_at_step": _int(0, 0, 10000),
                "end_at_step": _int(10000, 0, 10000),
                "return_with_leftover_noise": [["disable"]],
            },
            [("LATENT", "LATENT")],
            False,
        ),
        "VAEDecode": ("latent", {"samples": ["LATENT"], "vae": ["VAE"]}, [("IMAGE", "IMAGE")], False),
        "VAEEncode": ("latent", {"pixels": ["IMAGE"], "vae": ["VAE"]}, [("LATENT", "LATENT")], False),
        "VAEEncodeForInpaint": (
            "latent/inpaint",
            {"pixels": ["IMAGE"], "vae": ["VAE"], "mask": ["MASK"], "grow_mask_by": _int(6, 0, 64)},
            [("LATENT", "LATENT")],
            False,
        ),
        "SetLatentNoiseMask": (
            "latent/inpaint",
            {"samples": ["LATENT"], "mask": ["MASK"]},
            [("LATENT", "LATENT")],
            False,
        ),
        "LoadImage": (
            "image",
            {"image": [choices["input"], {"image_upload": True}]},
            [("IMAGE", "IMAGE"), ("MASK", "MASK")],
            False,
        ),
        "LoadImageMask": (
            "mask",
            {"image": [choices["input"], {"image_upload": True}], "channel": [["alpha", "red", "green", "blue"]]},
            [("MASK", "MASK")],
            False,
        ),
        "SaveImage": ("image", {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, [], True),
        "PreviewImage": ("image", {"images": ["IMAGE"]}, [], True),
        "LoraLoader": (
            "loaders",
            {
                "model": ["MODEL"],
                "clip": ["CLIP"],
                "lora_name": [choices["loras"]],
                "strength_model": _float(1.0, -10.0, 10.0),
                "strength_clip": _float(1.0, -10.0, 10.0),
            },
            [("MODEL", "MODEL"), ("CLIP", "CLIP")],
            False,
        ),
        "LatentUpscale": (
            "latent",
            {
                "samples": ["LATENT"],
                "upscale_method": [list(LATENT_METHODS)],
                "width": _int(1024, 0, 16384, 8),
                "height": _int(1024, 0, 16384, 8),
                "crop": [["disabled"]],
            },
            [("LATENT", "LATENT")],
            False,
        ),
        "LatentUpscaleBy": (
            "latent",
            {"samples": ["LATENT"], "upscale_method": [list(LATENT_METHODS)], "scale_by": _float(1.5, 1.0, 8.0)},
            [("LATENT", "LATENT")],
            False,
        ),
        "ImageScale": (
            "image/upscaling",
            {
                "image": ["IMAGE"],
                "upscale_method": [list(PIXEL_METHODS)],
                "width": _int(512, 1, 16384),
                "height": _int(512, 1, 16384),
                "crop": [["disabled", "center"]],
            },
            [("IMAGE", "IMAGE")],
            False,
        ),
        "ImageScaleBy": (
            "image/upscaling",
            {"image": ["IMAGE"], "upscale_method": [list(PIXEL_METHODS)], "scale_by": _float(1.0, 0.01, 8.0)},
            [("IMAGE", "IMAGE")],
            False,
        ),
        "UpscaleModelLoader": (
            "loaders",
            {"model_name": [choices["upscale_models"]]},
            [("UPSCALE_MODEL", "UPSCALE_MODEL")],
            False,
        ),
        "ImageUpscaleWithModel": (
            "image/upscaling",
            {"upscale_model": ["UPSCALE_MODEL"], "image": ["IMAGE"]},
            [("IMAGE", "IMAGE")],
            False,
        ),
        "ControlNetLoader": (
            "loaders",
            {"control_net_name": [choices["controlnet"]]},
            [("CONTROL_NET", "CONTROL_NET")],
            False,
        ),
        "ControlNetApply": (
            "conditioning/controlnet",
            {
                "conditioning": ["CONDITIONING"],
                "control_net": ["CONTROL_NET"],
                "image": ["IMAGE"],
                "strength": _float(1.0, 0.0, 2.0),
            },
            [("CONDITIONING", "CONDITIONING")],
            False,
        ),
        "ControlNetApplyAdvanced": (
            "conditioning/controlnet",
            {
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "control_net": ["CONTROL_NET"],
                "image": ["IMAGE"],
                "strength": _float(1.0, 0.0, 2.0),
                "start_percent": _float(0.0, 0.0, 1.0, 0.001),
                "end_percent": _float(1.0, 0.0, 1.0, 0.001),
            },
            [("CONDITIONING", "positive"), ("CONDITIONING", "negative")],
            False,
        ),
    }
    return {name: _info(name, *spec) for name, spec in table.items()}


def _info(
    name: str, category: str, required: dict[str, Any], outputs: list[tuple[str, str]], output_node: bool
) -> dict[str, Any]:
    return {
        "input": {"required": required, "optional": {}},
        "input_order": {"required": list(required)},
        "output": [kind for kind, _ in outputs],
        "output_is_list": [False] * len(outputs),
        "output_name": [label for _, label in outputs],
        "name": name,
        "display_name": name,
        "description": "",
        "python_module": "darkroom",
        "category": category,
        "output_node": output_node,
    }
