"""AUTOMATIC1111 sampler names → diffusers schedulers.

Clients (and the A1111-compatible API) speak in A1111's names; diffusers has one scheduler class per family plus config
switches (Karras sigmas, SDE variants). A scheduler is always rebuilt from the loaded pipeline's own scheduler config,
so the model's training schedule (betas, prediction type, timestep offset) carries over and only the solver changes.

The API validates names with this module, so it imports no torch or diffusers at module level.
Not mapped, because diffusers has no faithful equivalent: "DPM++ 2S a", "DPM fast", "DPM adaptive", "Restart".
"""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from darkroom.errors import InvalidRequest


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # A1111's display name
    scheduler: str  # diffusers class name
    overrides: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        """What `/samplers`-style listings show."""
        return {"name": self.name, "aliases": list(self.aliases), "scheduler": self.scheduler}


_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}

SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec(
        "Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral", "euler_ancestral")
    ),
    SamplerSpec("Euler", "EulerDiscreteScheduler", aliases=("k_euler", "euler")),
    SamplerSpec("LMS", "LMSDiscreteScheduler", aliases=("k_lms", "lms")),
    SamplerSpec("LMS Karras", "LMSDiscreteScheduler", _KARRAS, aliases=("k_lms_ka",)),
    SamplerSpec("Heun", "HeunDiscreteScheduler", aliases=("k_heun", "heun")),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2", "dpm_2")),
    SamplerSpec("DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS, aliases=("k_dpm_2_ka",)),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a", "dpm_2_ancestral")),
    SamplerSpec("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", _KARRAS, aliases=("k_dpm_2_a_ka",)),
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m", "dpmpp_2m")),
    SamplerSpec("DPM++ 2M Karras", "DPMSolverMultistepScheduler", _KARRAS, aliases=("k_dpmpp_2m_ka",)),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", aliases=("k_dpmpp_sde", "dpmpp_sde")),
    SamplerSpec("DPM++ SDE Karras", "DPMSolverSDEScheduler", _KARRAS, aliases=("k_dpmpp_sde_ka",)),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE, aliases=("k_dpmpp_2m_sde", "dpmpp_2m_sde")),
    SamplerSpec(
        "DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}, aliases=("k_dpmpp_2m_sde_ka",)
    ),
    SamplerSpec("DDIM", "DDIMScheduler", aliases=("ddim",)),
    # diffusers' PNDM with the Runge-Kutta warm-up skipped is PLMS, which is what SD 1.x ships as its default.
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("plms", "PNDM", "pndm")),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", aliases=("unipc",)),
    SamplerSpec("DEIS", "DEISMultistepScheduler", aliases=("deis",)),
    SamplerSpec("DDPM", "DDPMScheduler", aliases=("ddpm",)),
)


def _normalize(name: str) -> str:
    """Spelling varies between clients: `DPM++ 2M Karras`, `dpm++_2m_karras` and ` dpm++  2m karras ` are one."""
    return re.sub(r"[\s_-]+", " ", name.strip().lower())


def _index() -> dict[str, SamplerSpec]:
    table: dict[str, SamplerSpec] = {}
    for spec in SAMPLERS:
        for key in (spec.name, *spec.aliases):
            table[_normalize(key)] = spec
    return table


_BY_NAME: dict[str, SamplerSpec] = _index()


def resolve_sampler(name: str) -> SamplerSpec:
    spec = _BY_NAME.get(_normalize(name or ""))
    if spec is None:
        known = ", ".join(s.name for s in SAMPLERS)
        raise InvalidRequest(f"unknown sampler {name!r}; known samplers: {known}", field="sampler")
    return spec


def make_scheduler(spec: SamplerSpec, base_scheduler_config: Any) -> Any:
    """A new scheduler instance: schedulers keep per-run state, so one is never shared between runs or pipelines.
    It is a copy of one made once per sampler and model config and never run: `from_config` parses and checks the
    config on every call (about a millisecond per job), a deep copy only copies the tensors."""
    key = (spec.name, id(base_scheduler_config))
    with _TEMPLATES_LOCK:
        entry = _TEMPLATES.get(key)
    if entry is None or entry[0] is not base_scheduler_config:  # (an id can be reused once a config is gone)
        import diffusers

        cls = getattr(diffusers, spec.scheduler)
        entry = (base_scheduler_config, cls.from_config(base_scheduler_config, **spec.overrides))
        with _TEMPLATES_LOCK:
            if len(_TEMPLATES) >= _MAX_TEMPLATES:
                _TEMPLATES.pop(next(iter(_TEMPLATES)))  # the oldest: models come and go
            _TEMPLATES[key] = entry
    return copy.deepcopy(entry[1])


_TEMPLATES: dict[tuple[str, int], tuple[Any, Any]] = {}  # (sampler, id(config)) → (config, unused scheduler)
_TEMPLATES_LOCK = threading.Lock()
_MAX_TEMPLATES = 64


def seed_scheduler_noise(scheduler: Any, seeds: list[int]) -> None:
    """DPM++ SDE draws its noise from Brownian trees seeded on their own (from torch's global RNG by default).

    One tree per image, seeded with that image's seed, keeps SDE samplers reproducible and batch-independent.
    """
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = list(seeds)
