"""Blob stores: image bytes under content addresses. Metadata lives in the job store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from darkroom.extras import require
from darkroom.storage.base import BlobStore, content_key
from darkroom.storage.local import LocalBlobStore

if TYPE_CHECKING:
    from darkroom.config import Settings

__all__ = ["BlobStore", "LocalBlobStore", "content_key", "open_blob_store", "storage_health"]


def open_blob_store(settings: Settings) -> BlobStore:
    """The configured backend. boto3 is imported only when S3 is chosen, so a one-node setup never loads it."""
    if settings.storage.blob_backend == "s3":
        require("s3", ("boto3",), "storage.blob_backend=s3")
        from darkroom.storage.s3 import S3BlobStore

        return S3BlobStore.from_settings(settings.storage)
    return LocalBlobStore(settings.blobs_dir)


def storage_health(blobs: BlobStore) -> str:
    """For `/readyz`: "ok" or "error: …" from a store that can tell (the local folder checks its free space); a
    remote store's outages show as `StorageUnavailable` on use instead of a probe per readiness check."""
    health = getattr(blobs, "health", None)
    return health() if health is not None else "ok"
