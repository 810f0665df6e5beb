"""One engine per device, shared by the worker threads of a process.

Each worker used to build an engine of its own, so two workers on one device held two copies of every model, each
within its own memory budget. Here the threads of a process take shares of one engine: one model cache, one budget,
and the engine's run lock orders their use of the device (a pipeline is not re-entrant). A worker that stops closes
its share; the engine itself closes with the last share, so a restarted worker finds the models still loaded, and a
worker that failed on its device can still be replaced by a fresh engine once every share is gone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

from .base import Engine


class EnginePool:
    """Hands out shares of the one engine `factory` builds, building it again only after all shares closed."""

    def __init__(self, factory: Callable[[], Engine]) -> None:
        self.factory = factory
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._shares = 0

    def share(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self.factory()
            self._shares += 1
            return cast(Engine, _Share(self, self._engine))

    @property
    def shares(self) -> int:
        return self._shares

    def _release(self) -> None:
        with self._lock:
            self._shares -= 1
            if self._shares or self._engine is None:
                return
            engine, self._engine = self._engine, None
        engine.close()


class _Share:
    """The engine as one worker sees it: everything but `close`, which gives up this worker's share only."""

    def __init__(self, pool: EnginePool, engine: Engine) -> None:
        self._pool = pool
        self._engine = engine
        self._closed = False

    @property
    def shared(self) -> Engine:
        return self._engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool._release()
