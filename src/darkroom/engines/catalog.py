"""The engines this process is configured to run, described for operators (`GET /v1/engines`), without torch.

An API process must be able to say what its workers run on without building an engine: building the local one would
import torch and load models. So the local engine's capabilities are declared here (the diffusers engine uses these),
and its health comes from the process's workers; a remote engine is cheap to build and is asked over HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from darkroom.config import Settings

from . import routing
from .base import Capabilities, EngineHealth
from .routing import Route

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
    capacity: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "capabilities": self.capabilities.as_dict(),
            "health": self.health.as_dict(),
            "capacity": self.capacity,
        }


def configured_engines(
    settings: Settings, local_health: EngineHealth, route: Route | None = None
) -> list[EngineDescription]:
    """`local_health`: how the process's own workers fare, the local engine's health as seen without touching it.
    `route`: the process's routing state, whose circuit its own worker threads share."""
    if routing.is_remote(settings):
        engine = _remote(settings)
    else:
        engine = EngineDescription("diffusers", "diffusers", settings.device, DIFFUSERS_CAPABILITIES, local_health)
    return [replace(engine, capacity=capacity(settings, engine.capabilities.external, route))]


def capacity(settings: Settings, external: bool, route: Route | None) -> dict[str, object]:
    """What the engine's workers may take and how many at once: the routing rules as they apply to it."""
    rules, remote = settings.routing, routing.is_remote(settings)
    return {
        "workers": settings.workers,
        "max_concurrency": rules.max_concurrency,
        "labels": routing.claimable_labels(external, rules) or ["confidential", "internal", "public"],
        "overflow_queue_depth": rules.overflow_queue_depth if remote else None,
        "overflow_wait_seconds": rules.overflow_wait_seconds if remote else None,
        "circuit": route.circuit.state() if route is not None and remote else None,
    }


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
