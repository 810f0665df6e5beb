"""A1111 sampler names resolve to diffusers schedulers that really run on a (tiny) Stable Diffusion pipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from darkroom.engines.samplers import SAMPLERS, make_scheduler, resolve_sampler, seed_scheduler_noise
from darkroom.errors import InvalidRequest
from darkroom.schemas import GenerationRequest

REQUIRED = [
    "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras", "DDIM", "UniPC", "LMS", "LMS Karras", "Heun", "DPM2", "DPM2 a", "PNDM", "DDPM",
]  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_diffusers_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from darkroom.engines.diffusers_engine import DiffusersEngine
    from darkroom.models.registry import ModelRegistry

    registry = ModelRegistry(tiny_diffusers_model.parent, tmp_path_factory.mktemp("hashes") / "hashes.json")
    yield DiffusersEngine(registry, device="cpu")


def _request(sampler: str, seed: int = 11, n: int = 1, steps: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt="a cat", width=64, height=64, steps=steps, seed=seed, n=n, sampler=sampler)


def _pixels(result) -> list[np.ndarray]:
    return [np.asarray(img.image) for img in result.images]


@pytest.mark.parametrize("name", REQUIRED)
def test_required_names_resolve(name: str) -> None:
    assert resolve_sampler(name) in SAMPLERS


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("euler a", "Euler a"),
        ("EULER_A", "Euler a"),
        ("k_euler_a", "Euler a"),
        ("euler_ancestral", "Euler a"),
        ("  dpm++  2m   karras ", "DPM++ 2M Karras"),
        ("k_dpmpp_2m_ka", "DPM++ 2M Karras"),
        ("dpmpp_2m_sde", "DPM++ 2M SDE"),
        ("k_lms", "LMS"),
        ("pndm", "PLMS"),
    ],
)
def test_lookup_is_case_insensitive_and_knows_aliases(given: str, expected: str) -> None:
    assert resolve_sampler(given).name == expected


@pytest.mark.parametrize("name", ["", "Euler b", "dpm++ 9m"])
def test_unknown_sampler_is_an_invalid_request_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_sampler(name)
    assert info.value.field == "sampler"


def test_names_and_aliases_are_unambiguous() -> None:
    seen: dict[str, str] = {}
    for spec in SAMPLERS:
        for key in (spec.name, *spec.aliases):
            assert resolve_sampler(key) is spec, key
            assert seen.setdefault(key.lower(), spec.name) == spec.name
        assert spec.public()["name"] == spec.name


def test_scheduler_keeps_the_models_schedule_and_applies_overrides(engine) -> None:
    from darkroom.models.smoke import SD15_SCHEDULER_CONFIG

    base = engine._pipelines(engine.registry.default())[0].scheduler_config
    karras = make_scheduler(resolve_sampler("DPM++ 2M SDE Karras"), base)
    assert type(karras).__name__ == "DPMSolverMultistepScheduler"
    assert karras.config.use_karras_sigmas is True
    assert karras.config.algorithm_type == "sde-dpmsolver++"
    assert karras.config.beta_end == SD15_SCHEDULER_CONFIG["beta_end"]
    assert karras.config.steps_offset == 1
    plain = make_scheduler(resolve_sampler("DPM++ 2M"), base)
    assert plain.config.use_karras_sigmas is False


def test_each_run_gets_a_fresh_scheduler_copied_from_an_unused_one() -> None:
    """The copy made for a run is new and in its first state, whatever an earlier run did to its own copy: the same
    steps give the same timesteps, and a run's state (DPM++'s model outputs, the step index) is not carried over."""
    import torch

    from darkroom.models.smoke import SD15_SCHEDULER_CONFIG

    spec = resolve_sampler("DPM++ 2M Karras")
    first = make_scheduler(spec, SD15_SCHEDULER_CONFIG)
    first.set_timesteps(5)
    sample = torch.zeros(1, 4, 8, 8)
    for t in first.timesteps[:3]:
        sample = first.step(torch.ones_like(sample), t, sample).prev_sample
    second = make_scheduler(spec, SD15_SCHEDULER_CONFIG)
    assert second is not first and second.step_index is None
    assert second.model_outputs == [None] * len(second.model_outputs)
    second.set_timesteps(5)
    assert torch.equal(second.timesteps, first.timesteps)
    fresh = type(first).from_config(SD15_SCHEDULER_CONFIG, **spec.overrides)
    assert dict(second.config) == dict(fresh.config)


def test_sde_noise_is_seeded_per_image() -> None:
    from darkroom.models.smoke import SD15_SCHEDULER_CONFIG

    sde = make_scheduler(resolve_sampler("DPM++ SDE"), SD15_SCHEDULER_CONFIG)
    seed_scheduler_noise(sde, [3, 4])
    assert sde.noise_sampler_seed == [3, 4]
    euler = make_scheduler(resolve_sampler("Euler"), SD15_SCHEDULER_CONFIG)
    seed_scheduler_noise(euler, [3])  # no Brownian tree: nothing to seed, nothing breaks
    assert not hasattr(euler, "noise_sampler_seed")


@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_runs_two_steps_on_the_tiny_model(engine, spec) -> None:
    steps: list[tuple[int, int]] = []
    result = engine.generate(_request(spec.name), None, lambda done, total: steps.append((done, total)))
    assert result.scheduler == spec.scheduler
    assert steps == [(1, 2), (2, 2)]
    (pixels,) = _pixels(result)
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 0


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE Karras", "DPM2 a", "DDPM"])
def test_stochastic_samplers_reproduce_and_do_not_depend_on_the_batch(engine, name: str) -> None:
    nop = lambda done, total: None  # noqa: E731
    pair = _pixels(engine.generate(_request(name, seed=21, n=2, steps=3), None, nop))
    again = _pixels(engine.generate(_request(name, seed=21, n=2, steps=3), None, nop))
    second_alone = _pixels(engine.generate(_request(name, seed=22, n=1, steps=3), None, nop))
    assert all(np.array_equal(a, b) for a, b in zip(pair, again, strict=True))
    assert np.array_equal(pair[1], second_alone[0])
    assert not np.array_equal(pair[0], pair[1])


def test_module_imports_no_torch() -> None:
    """The API process validates samplers; it must not pay for torch."""
    code = "import sys, darkroom.engines.samplers; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
