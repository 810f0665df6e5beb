"""The engines this process is configured to run, described for operators (`GET /v1/engines`), without torch.

An API process must be able to say what its workers run on without building an engine: building the local one would
import torch and load models. So the local engine's capabilities are declared here (the diffusers engine uses these),
and its health comes from the process's workers; a remote engine is cheap to build and is asked over HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from darkroom.config import Settings

from .base import Capabilities, EngineHealth

DIFFUSERS_CAPABILITIES = Capabilities(
    families=frozenset({"sd1", "sd2", "sdxl", "sdxl-refiner"}),
    adapters=frozenset({"lora", "embedding", "controlnet", "hires", "refiner"}),
)
"""Sizes are bounded by the service's `limits` and the device's memory (an image that cannot fit fails for good)."""

HEALTH_PROBE_SECONDS = 5.0  # an operator's listing must answer even when a remote does not


@dataclass(frozen=True)
class EngineDescription:
    name: str
    kind: str  # the `engine` setting that selects it
    target: str  # the device, or the remote's host
    capabilities: Capabilities
    health: EngineHealth

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "capabilities": self.capabilities.as_dict(),
            "health": self.health.as_dict(),
        }


def configured_engines(settings: Settings, local_health: EngineHealth) -> list[EngineDescription]:
    """`local_health`: how the process's own workers fare, the local engine's health as seen without touching it."""
    if settings.engine != "diffusers":
        return [_remote(settings)]
    return [EngineDescription("diffusers", "diffusers", settings.device, DIFFUSERS_CAPABILITIES, local_health)]


def _remote(settings: Settings) -> EngineDescription:
    from .remote_http import build_remote

    remote = settings.remote.model_copy(
        update={"timeout_seconds": min(settings.remote.timeout_seconds, HEALTH_PROBE_SECONDS)}
    )
    try:
        engine = build_remote(settings.model_copy(update={"remote": remote}))
    except ValueError as exc:  # no URL, or its key cannot be read: say so rather than fail the listing
        capabilities = Capabilities(modes=frozenset(), external=remote.external)
        name = f"{settings.engine}-remote"
        return EngineDescription(name, settings.engine, remote.url or "", capabilities, EngineHealth(False, str(exc)))
    try:
        return EngineDescription(engine.name, settings.engine, engine.device, engine.capabilities, engine.health())
    finally:
        engine.close()
