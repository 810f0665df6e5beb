"""What the A1111 and ComfyUI engines send for a job (engines/remote_a1111.py, remote_comfyui.py): the request a
real server of that kind reads. Their round trips run against darkroom's own compatible APIs in
tests/integration/test_remote_engine.py; here the parts those APIs do not exercise (LoRA chains, Karras schedules,
img2img batches) and the refusals, without a server."""

from __future__ import annotations

import contextlib

import pytest
from PIL import Image

from darkroom.engines.remote_a1111 import A1111Engine
from darkroom.engines.remote_comfyui import workflow
from darkroom.errors import EngineError
from darkroom.schemas import GenerationRequest, LoraSpec

BASE = {"prompt": "a kite", "model": "sd15", "width": 64, "height": 64, "steps": 4, "seed": 9}


def test_a1111_sends_loras_as_prompt_tags_the_model_as_an_override_and_a_mask_for_inpainting() -> None:
    loras = [LoraSpec(name="ink", weight=0.6)]
    request = GenerationRequest(**BASE, loras=loras, n=2, init_image="blob:a", mask_image="blob:b", strength=0.4)
    with contextlib.closing(A1111Engine("http://127.0.0.1:9")) as engine:
        source = Image.new("RGB", (64, 64))
        path, body = engine.body(request, source, Image.new("L", (64, 64)))
        assert path == "/sdapi/v1/img2img" and body["prompt"] == "a kite <lora:ink:0.6>"
        assert body["override_settings"] == {"sd_model_checkpoint": "sd15"} and body["batch_size"] == 2
        assert body["denoising_strength"] == 0.4 and body["mask"] and body["init_images"]
        with pytest.raises(EngineError) as refused:
            engine.body(GenerationRequest(**BASE, hires={"scale": 2.0}), None, None)
        assert refused.value.permanent and refused.value.field == "hires"


def test_comfyui_workflow_chains_loras_maps_karras_and_repeats_an_img2img_latent() -> None:
    loras = [LoraSpec(name="ink", weight=0.6), LoraSpec(name="film", weight=1.0)]
    graph = workflow(GenerationRequest(**BASE, loras=loras, sampler="DPM++ 2M Karras"), None)
    sampler = graph["3"]["inputs"]
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["seed"]) == ("dpmpp_2m", "karras", 9)
    assert graph["4"]["inputs"]["ckpt_name"] == "sd15.safetensors"
    assert graph["200"]["inputs"]["model"] == ["4", 0] and graph["201"]["inputs"]["clip"] == ["200", 1]
    assert sampler["model"] == ["201", 0] and graph["6"]["inputs"]["clip"] == ["201", 1]
    assert graph["5"] == {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}

    edit = workflow(GenerationRequest(**BASE, n=3, init_image="blob:a", strength=0.5), "input/source.png")
    assert edit["10"]["inputs"]["image"] == "input/source.png" and edit["3"]["inputs"]["denoise"] == 0.5
    assert edit["11"]["inputs"] == {"samples": ["5", 0], "amount": 3}
    assert edit["3"]["inputs"]["latent_image"] == ["11", 0]
