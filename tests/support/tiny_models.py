"""Tiny real models on disk, in the two layouts users bring: a diffusers folder and an original single-file checkpoint.

The single file is written by converting the tiny pipeline's diffusers state dicts to the original LDM layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`) with the mapping below.
Loading it back through diffusers' single-file loader and getting the same pixels as the diffusers folder proves both
the mapping and darkroom's loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from darkroom.models.smoke import build_tiny_pipeline

UNET_RESNET_NAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
VAE_ATTENTION_NAMES = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def make_diffusers_model(directory: Path, name: str = "tiny-diffusers", seed: int = 0) -> Path:
    folder = Path(directory) / name
    build_tiny_pipeline(seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


def make_single_file_model(directory: Path, name: str = "tiny-single", seed: int = 0) -> Path:
    """`name.safetensors` in LDM layout plus its `name.config/` sidecar (the same pipeline's configs and tokenizer)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(seed=seed)
    state = to_ldm_state_dict(pipe)
    checkpoint = directory / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint), metadata={"format": "pt"})
    write_config_sidecar(pipe, directory / f"{name}.config")
    return checkpoint


def write_config_sidecar(pipe: Any, folder: Path) -> Path:
    """A diffusers layout without weights: what `from_single_file(config=...)` reads to build the modules."""
    tmp = folder.with_name(folder.name + ".full")
    pipe.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(tmp, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    shutil.rmtree(tmp)
    return folder


def to_ldm_state_dict(pipe: Any) -> dict[str, Any]:
    unet_config = dict(pipe.unet.config)
    vae_config = dict(pipe.vae.config)
    out: dict[str, Any] = {}
    for key, tensor in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key_to_ldm(key, unet_config)] = tensor
    for key, tensor in pipe.vae.state_dict().items():
        ldm_key, tensor = vae_key_to_ldm(key, tensor, vae_config)
        out["first_stage_model." + ldm_key] = tensor
    for key, tensor in pipe.text_encoder.state_dict().items():
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = tensor
    return out


# --- UNet -------------------------------------------------------------------------------------------------------------


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """LDM numbers its UNet as flat `input_blocks` / `output_blocks` lists; diffusers nests them per resolution.

    Per resolution level there are `layers_per_block` (resnet [+ attention]) entries and, except on the last level, one
    downsampler entry; the decoder side has one more entry per level, the last one carrying the upsampler.
    """
    per_level = config["layers_per_block"]
    parts = key.split(".")
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    head = ".".join(parts[:-1])
    if head in fixed:
        return f"{fixed[head]}.{parts[-1]}"
    if parts[0] == "down_blocks":
        return _down_key(parts, per_level)
    if parts[0] == "up_blocks":
        return _up_key(parts, per_level, config)
    if parts[0] == "mid_block":
        return _mid_key(parts)
    raise KeyError(f"no LDM name for UNet key {key}")


def _down_key(parts: list[str], per_level: int) -> str:
    level, kind = int(parts[1]), parts[2]
    if kind == "downsamplers":  # down_blocks.L.downsamplers.0.conv.weight
        return f"input_blocks.{(level + 1) * (per_level + 1)}.0.op.{parts[-1]}"
    index = 1 + level * (per_level + 1) + int(parts[3])
    rest = ".".join(parts[4:])
    if kind == "resnets":
        return f"input_blocks.{index}.0.{_resnet_param(rest)}"
    return f"input_blocks.{index}.1.{rest}"


def _up_key(parts: list[str], per_level: int, config: dict[str, Any]) -> str:
    level, kind = int(parts[1]), parts[2]
    if kind == "upsamplers":  # after the resnet, and after the attention when the level has one
        index = level * (per_level + 1) + per_level
        slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
        return f"output_blocks.{index}.{slot}.conv.{parts[-1]}"
    index = level * (per_level + 1) + int(parts[3])
    rest = ".".join(parts[4:])
    if kind == "resnets":
        return f"output_blocks.{index}.0.{_resnet_param(rest)}"
    return f"output_blocks.{index}.1.{rest}"


def _mid_key(parts: list[str]) -> str:
    kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
    if kind == "resnets":  # resnet, attention, resnet
        return f"middle_block.{0 if index == 0 else 2}.{_resnet_param(rest)}"
    return f"middle_block.1.{rest}"


def _resnet_param(rest: str) -> str:
    module, _, param = rest.rpartition(".")
    for diffusers_name, ldm_name in UNET_RESNET_NAMES:
        if module == diffusers_name:
            return f"{ldm_name}.{param}"
    raise KeyError(f"unknown resnet parameter {rest}")


# --- VAE --------------------------------------------------------------------------------------------------------------


def vae_key_to_ldm(key: str, tensor: Any, config: dict[str, Any]) -> tuple[str, Any]:
    """The LDM decoder numbers its `up` levels from the bottom (lowest resolution is the highest index); its attention
    projections are 1x1 convolutions, diffusers' are linear layers."""
    levels = len(config["block_out_channels"])
    parts = key.split(".")
    coder, rest = parts[0], parts[1:]
    if coder in ("quant_conv", "post_quant_conv"):
        return key, tensor
    name = ".".join(rest)
    if name.startswith("conv_norm_out."):
        return f"{coder}.norm_out.{rest[-1]}", tensor
    if rest[0] in ("conv_in", "conv_out"):
        return key, tensor
    if rest[0] == "down_blocks":
        return f"{coder}.{_vae_level_key(rest, 'down', int(rest[1]), 'downsample')}", tensor
    if rest[0] == "up_blocks":
        return f"{coder}.{_vae_level_key(rest, 'up', levels - 1 - int(rest[1]), 'upsample')}", tensor
    if rest[0] == "mid_block":
        return _vae_mid_key(coder, rest, tensor)
    raise KeyError(f"no LDM name for VAE key {key}")


def _vae_level_key(rest: list[str], side: str, level: int, sampler: str) -> str:
    # (down|up)_blocks.I.resnets.J.<param> or (down|up)_blocks.I.(down|up)samplers.0.conv.<param>
    if rest[2].endswith("samplers"):
        return f"{side}.{level}.{sampler}.conv.{rest[-1]}"
    param = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
    return f"{side}.{level}.block.{rest[3]}.{param}"


def _vae_mid_key(coder: str, rest: list[str], tensor: Any) -> tuple[str, Any]:
    kind, index = rest[1], int(rest[2])
    if kind == "resnets":
        param = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
        return f"{coder}.mid.block_{index + 1}.{param}", tensor
    module, param = ".".join(rest[3:-1]), rest[-1]
    for diffusers_name, ldm_name in VAE_ATTENTION_NAMES:
        if module == diffusers_name:
            if param == "weight" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
            return f"{coder}.mid.attn_1.{ldm_name}.{param}", tensor
    raise KeyError(f"unknown VAE attention parameter {'.'.join(rest)}")


def label(model: Path, **meta: Any) -> Path:
    """Write darkroom's metadata next to (single file) or inside (folder) a model."""
    target = model / "darkroom.json" if model.is_dir() else model.with_suffix(".json")
    target.write_text(json.dumps(meta))
    return target


# --- SDXL -------------------------------------------------------------------------------------------------------------


def make_sdxl_diffusers_model(directory: Path, name: str = "tiny-xl", seed: int = 0) -> Path:
    folder = Path(directory) / name
    build_tiny_xl_pipeline(seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_xl_pipeline(seed: int = 0) -> Any:
    """SDXL's shape in miniature: two text encoders (the second with a projection) and size/crop conditioning."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from darkroom.models.smoke import SD15_SCHEDULER_CONFIG, build_tiny_tokenizer, tiny_text_encoder, tiny_vae

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop ids of 8 dims + the pooled text embedding
        cross_attention_dim=64,  # both encoders' hidden states side by side
    )
    torch.manual_seed(seed + 3)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed, tokenizer),
        text_encoder_2=CLIPTextModelWithProjection(config).eval(),
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
        add_watermarker=False,
    )


# --- LoRA adapters and textual-inversion embeddings -------------------------------------------------------------------

LORA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(
    directory: Path, name: str, fmt: str = "kohya", *, pipe: Any = None, seed: int = 7, rank: int = 4
) -> Path:
    """`name.safetensors`: a LoRA with random, nonzero weights on the attention projections of the tiny pipeline's
    UNet and text encoder (or of `pipe`, e.g. the tiny SDXL one), in one of the key layouts users bring:
    - `kohya`: A1111/kohya sd-scripts (`lora_unet_down_blocks_1_…_to_q.lora_down.weight`, `.alpha`, `lora_te_…`);
    - `diffusers`: what diffusers' training scripts save (`unet.….to_q.lora.down.weight`, `text_encoder.…`);
    - `peft`: PEFT's own names (`unet.….to_q.lora_A.weight`).
    The same `seed` gives the same adapter in every layout, so they must produce the same pixels."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    pipe = pipe if pipe is not None else build_tiny_pipeline(seed=0)
    torch.manual_seed(seed)
    parts: dict[str, dict[str, Any]] = {}
    for prefix, module, targets in (
        ("unet", pipe.unet, LORA_UNET_TARGETS),
        ("text_encoder", pipe.text_encoder, LORA_TEXT_TARGETS),
    ):
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets)
        inject_adapter_in_model(config, module)  # random A and B: a LoRA that visibly changes the output
        parts[prefix] = get_peft_model_state_dict(module)
    if fmt == "peft":
        state = {f"{prefix}.{k}": v for prefix, sd in parts.items() for k, v in sd.items()}
    elif fmt == "diffusers":
        state = {
            f"{prefix}.{k}": v for prefix, sd in parts.items() for k, v in convert_state_dict_to_diffusers(sd).items()
        }
    elif fmt == "kohya":
        state = convert_state_dict_to_kohya({f"{prefix}.{k}": v for prefix, sd in parts.items() for k, v in sd.items()})
    else:
        raise ValueError(f"unknown LoRA layout {fmt!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    metadata = {"format": "pt", "ss_output_name": name, "ss_network_dim": str(rank)}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def make_embedding(
    directory: Path, name: str, vectors: int = 2, width: int = 32, seed: int = 11, sdxl: bool = False
) -> Path:
    """`name.safetensors` in A1111's layout (`emb_params`: vectors x text-encoder width), random values; `sdxl`: one
    tensor per text encoder (`clip_l`, `clip_g`), as SDXL embeddings are saved."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    keys = ("clip_l", "clip_g") if sdxl else ("emb_params",)
    tensors = {key: torch.randn(vectors, width, generator=generator) for key in keys}
    path = directory / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"step": "100"})
    return path


# --- upscalers -------------------------------------------------------------------------------------------------------


def make_esrgan_upscaler(directory: Path, name: str = "tiny-esrgan-2x", scale: int = 2, seed: int = 5) -> Path:
    """`name.safetensors`: an ESRGAN (RRDBNet) upscaler with random weights and tiny channel counts (8 filters, one
    block), the architecture and key layout of the ESRGAN models users bring, which spandrel detects from the keys."""
    import torch
    from safetensors.torch import save_file

    from darkroom.engines.upscalers import import_spandrel

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    from darkroom.engines.diffusers_engine import _LOAD_LOCK

    with _LOAD_LOCK:  # a pipeline loading on a worker thread would put this model's weights on the meta device
        torch.manual_seed(seed)
        model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    save_file({key: value.detach().contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


# --- ControlNet and the SDXL refiner ---------------------------------------------------------------------------------


def make_controlnet(directory: Path, name: str, *, pipe: Any = None, fmt: str = "diffusers", seed: int = 13) -> Path:
    """A ControlNet for the tiny pipeline (or `pipe`, e.g. the tiny SDXL one): its UNet's encoder copied, as training
    starts, and the zero convolutions (which a fresh ControlNet has at zero, changing nothing) and the hint encoder
    given random weights, so a unit visibly steers the picture. `fmt`: `diffusers` (a folder with config.json) or
    `single_file` (`name.safetensors` with diffusers' keys, how SDXL ControlNets often ship) or `original` (the
    original `control_model.*` layout of lllyasviel's SD 1.5 files), all three of one seed holding one model."""
    import torch
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from darkroom.engines.diffusers_engine import _LOAD_LOCK

    pipe = pipe if pipe is not None else build_tiny_pipeline(seed=0)
    with _LOAD_LOCK:  # a pipeline loading on a worker thread would put these weights on the meta device
        model = ControlNetModel.from_unet(pipe.unet)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for prefix in ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"):
                for key, param in model.named_parameters():
                    if key.startswith(prefix):
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        model.save_pretrained(directory / name, safe_serialization=True)
        return directory / name
    path = directory / f"{name}.safetensors"
    state = controlnet_to_ldm(model) if fmt == "original" else model.state_dict()
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def controlnet_to_ldm(model: Any) -> dict[str, Any]:
    """A ControlNet's weights under the original names: its UNet-encoder copy numbered like the UNet's input blocks,
    the hint encoder as `input_hint_block.N` (convolutions at even indices), the zero convolutions as `zero_convs`."""
    config = dict(model.config)
    out: dict[str, Any] = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "controlnet_cond_embedding":
            last = len(model.controlnet_cond_embedding.blocks) + 1
            index = {"conv_in": 0, "conv_out": 2 * last}.get(parts[1])
            ldm = f"input_hint_block.{index if index is not None else 2 * (int(parts[2]) + 1)}.{parts[-1]}"
        elif parts[0] == "controlnet_down_blocks":
            ldm = f"zero_convs.{parts[1]}.0.{parts[-1]}"
        elif parts[0] == "controlnet_mid_block":
            ldm = f"middle_block_out.0.{parts[-1]}"
        elif parts[0] == "add_embedding":
            ldm = f"label_emb.0.{0 if parts[1] == 'linear_1' else 2}.{parts[-1]}"
        else:
            ldm = unet_key_to_ldm(key, config)
        out[f"control_model.{ldm}"] = tensor
    return out


def make_sdxl_refiner(directory: Path, name: str = "tiny-xl-refiner", seed: int = 1) -> Path:
    """An SDXL refiner in miniature: no first text encoder, the second one's states alone as context, and an
    aesthetic score beside the size conditioning (five time ids, not six). Same VAE as the tiny SDXL model, so it
    reads that model's latents."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from darkroom.models.smoke import SD15_SCHEDULER_CONFIG, build_tiny_tokenizer, tiny_vae

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=5 * 8 + 32,  # five ids (size, crop, aesthetic score) + pooled text
        cross_attention_dim=32,
    )
    torch.manual_seed(seed + 3)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(0),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection(config).eval(),
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    folder = Path(directory) / name
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
