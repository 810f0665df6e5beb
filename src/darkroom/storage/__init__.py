"""Blob stores: image bytes under content addresses. Metadata lives in the job store."""

from darkroom.storage.base import BlobStore, content_key
from darkroom.storage.local import LocalBlobStore

__all__ = ["BlobStore", "LocalBlobStore", "content_key"]
