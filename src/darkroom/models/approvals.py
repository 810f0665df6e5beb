"""Approved model versions: model id → sha256, kept in the shared database so every node agrees.

The API node approves what its models folder holds when it starts (a model id is approved once, with the hash first
seen); `darkroom models approve ID` re-approves after a deliberate change. Workers on other nodes verify their local
copies against this list and do not claim jobs for models they lack or whose bytes differ (`verify_local_models`).
"""

from __future__ import annotations

from darkroom.kv import SettingsKV
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import ModelInfo

KEY = "approved_models"


def approved(kv: SettingsKV) -> dict[str, str]:
    return dict(kv.get(KEY, {}) or {})


def approve_new(kv: SettingsKV, models: list[ModelInfo]) -> dict[str, str]:
    """Record the hash of every model not approved yet; returns the full approved map."""
    current = approved(kv)
    fresh = {m.id: m.sha256 for m in models if m.id not in current}
    if fresh:
        current.update(fresh)
        kv.set(KEY, current)
    return current


def approve(kv: SettingsKV, registry: ModelRegistry, model_id: str) -> str:
    """(Re-)approve the local copy of one model; returns its sha256."""
    info = registry.get(model_id)
    current = approved(kv)
    current[info.id] = info.sha256
    kv.set(KEY, current)
    return info.sha256
