"""Blobs in a local folder (the embedded default). Writes are atomic: temp file, fsync, rename.

OS errors leave as typed storage errors (`storage_error`): a full disk is `StorageFull` (507), anything else but a
missing blob is `StorageUnavailable` (503), so neither the API nor the worker mistakes them for a bad request.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from darkroom.errors import NotFound
from darkroom.storage.base import content_key, storage_error

_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}$")
MIN_FREE_BYTES = 64 * 1024 * 1024  # below this `/readyz` says the disk is (nearly) full: a few images' worth left


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # Keys are content addresses we made; anything else (e.g. "../") is refused, never joined onto the root.
        if not _KEY.match(key):
            raise NotFound("no such blob", field="key")
        return self.root / key

    def put(self, data: bytes, content_type: str) -> tuple[str, str]:
        digest, key = content_key(data)
        path = self._path(key)
        if path.exists():
            return digest, key
        try:
            self._write(path, data)
        except OSError as exc:
            raise storage_error(exc, "store a blob") from exc
        return digest, key

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound("no such blob", field="key") from None
        except OSError as exc:
            raise storage_error(exc, "read a blob") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def health(self, min_free_bytes: int = MIN_FREE_BYTES) -> str:
        """Returns "ok", or "error: …" when the folder is unreachable or its disk has less than `min_free_bytes`
        free: what `/readyz` shows, so an orchestrator stops routing work here before writes fail."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            return f"error: {type(exc).__name__}"
        return "ok" if free >= min_free_bytes else f"error: disk nearly full ({free // 1024} KiB free)"
