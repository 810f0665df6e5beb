"""Which models this worker may serve: the ones it has, in the approved version.

On many GPU nodes each keeps its own copy of the models folder (a PVC, an rsync, a baked image), and copies drift: a
node misses a model, or holds an older or half-copied version under the same name. A worker that served such a copy
would render different pixels for the same seed than its peers while the provenance claimed the approved hash. So a
worker verifies its local copies against the approved sha256 and claims only jobs for models that match.

Hashes come from the registry, which caches them by (path, size, mtime): a restart does not rehash gigabytes, and any
write to a weights file (a new copy, a truncated download) changes its mtime and so forces a rehash.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from darkroom.errors import ModelLoadError
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import GenerationRequest, ModelInfo

log = logging.getLogger(__name__)


def verify_local_models(registry: ModelRegistry, approved: Mapping[str, str] | None) -> set[str]:
    """Ids of local models this worker can serve. `approved` maps model id → approved sha256; a model with no
    recorded hash (or `approved=None`) is served as it is, one whose hash differs is not."""
    servable: set[str] = set()
    local = registry.scan()
    for info in local:
        want = (approved or {}).get(info.id)
        if want is None or want.lower() == info.sha256:
            servable.add(info.id)
        else:
            log.warning(
                "not serving %s: local copy %s has sha256 %s, approved is %s", info.id, info.path, info.sha256, want
            )
    missing = set(approved or {}) - {m.id for m in local}
    if missing:
        log.info("approved models not present on this worker: %s", ", ".join(sorted(missing)))
    return servable


def check_pinned_version(info: ModelInfo, request: GenerationRequest) -> None:
    """The job runs on the version it was admitted with, or fails at once (for good): a model file replaced after
    submit must not render under the old version's name in the provenance."""
    if request.model_sha256 and request.model_sha256 != info.sha256:
        raise ModelLoadError(
            f"model {info.id!r} changed since the job was queued (now {info.sha256[:12]}, queued with "
            f"{request.model_sha256[:12]}); approve the new version or restore the file, then submit again",
            field="model",
            code="model_changed",
        )
