"""The blob store interface. A new backend (S3, …) is a new module implementing it."""

from __future__ import annotations

import hashlib
from typing import Protocol


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
