"""The blob store interface. A new backend (S3, …) is a new module implementing it."""

from __future__ import annotations

import errno
import hashlib
from typing import Protocol

from darkroom.errors import StorageFull, StorageUnavailable

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def content_key(data: bytes) -> tuple[str, str]:
    """(sha256, key) for bytes. Keys fan out over two directory levels so no folder grows huge."""
    digest = hashlib.sha256(data).hexdigest()
    return digest, f"{digest[:2]}/{digest[2:4]}/{digest}"


class BlobStore(Protocol):
    def put(self, data: bytes, content_type: str) -> tuple[str, str]:
        """Store bytes; returns (sha256, key). Writing the same bytes twice is a no-op."""
        ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...


def storage_error(exc: OSError, action: str) -> StorageUnavailable:
    """The typed error for an OS error from a blob store: a full disk (507) or an unavailable store (503). Both are
    the node's problem, never the request's, so the worker backs off instead of failing the job."""
    if exc.errno in FULL_ERRNOS:
        return StorageFull(f"blob store is full: cannot {action} ({exc.strerror or exc})", field=None)
    return StorageUnavailable(f"blob store unavailable: cannot {action} ({type(exc).__name__}: {exc})", field=None)
