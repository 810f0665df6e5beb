"""A worker's entry in the worker registry, kept fresh from a side thread.

`start()` registers the worker (id, host, pid, device, memory, models) and heartbeats every `heartbeat_seconds` with
what it holds now, so the scheduler and operators see live state. Each beat also marks silent peers `lost`: with
workers on many nodes somebody is always awake to notice a dead one, without a coordinator process. A failed beat
(the database restarting) is logged and retried at the next tick; the worker's jobs never depend on it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from darkroom.config import Settings
from darkroom.jobs.workers import WorkerInfo, WorkerRegistry, WorkerState, stale_after
from darkroom.worker.health import HealthView

log = logging.getLogger("darkroom.worker")

ModelIds = Iterable[str | tuple[str, str]]
"""Model ids, or (id, sha256) pairs as `DiffusersEngine.loaded_models()` returns them."""


def _ids(models: ModelIds) -> list[str]:
    return [m[0] if isinstance(m, tuple) else m for m in models]


class Presence:
    def __init__(
        self,
        registry: WorkerRegistry,
        worker_id: str,
        settings: Settings,
        *,
        loaded_models: Callable[[], ModelIds] = tuple,
        jobs_done: Callable[[], int] = lambda: 0,
        models_available: Callable[[], Iterable[str]] | None = None,
        draining: Callable[[], bool] = lambda: False,
        device: tuple[str, int | None] | None = None,
        health: Callable[[], HealthView] | None = None,
        batch_limits: Callable[[], list[dict[str, object]]] = list,
    ) -> None:
        """`draining`: polled each beat, so a signal handler only flips a flag and the database write happens here.
        `device`: (description, memory in bytes); detected from `settings.device` when not given.
        `health`: the worker's own health, polled each beat; an unhealthy worker shows as `unhealthy`.
        `batch_limits`: its engine's batch limits in force (`engine_batch_limits`), polled each beat."""
        self.registry = registry
        self.worker_id = worker_id
        self.settings = settings
        self.loaded_models = loaded_models
        self.jobs_done = jobs_done
        self.models_available = models_available
        self.draining = draining
        self.device = device
        self.health = health
        self.batch_limits = batch_limits
        self.state: WorkerState | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Register now (so the row exists when this returns), then heartbeat in the background."""
        self._register()
        self._thread = threading.Thread(target=self._run, name=f"presence-{self.worker_id}", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Tell operators and the scheduler that this worker finishes its job and takes no more."""
        self.registry.mark_draining(self.worker_id)
        self.state = WorkerState.draining

    def stop(self) -> None:
        """Stop heartbeating and record a clean exit (`stopped`, not `lost`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.heartbeat_seconds + 10)
        try:
            self.registry.mark_stopped(self.worker_id)
        except Exception:  # the database is down as we exit: peers will mark us lost instead
            log.warning("worker %s could not record its stop", self.worker_id, exc_info=True)
        self.state = WorkerState.stopped

    # --- the side thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        stale = stale_after(self.settings.lease_seconds, self.settings.heartbeat_seconds)
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self.beat()
                if lost := self.registry.mark_lost(stale):
                    log.warning("workers stopped heartbeating, marked lost: %s", ", ".join(lost))
            except Exception:
                log.warning("worker %s: heartbeat to the registry failed; retrying", self.worker_id, exc_info=True)

    def beat(self) -> None:
        if self.state is None:
            self._register()
            return
        if self.state is WorkerState.active and self.draining():
            self.drain()
        available = list(self.models_available()) if self.models_available else None
        healthy = self.health().healthy if self.health else True
        state = self.registry.heartbeat(
            self.worker_id,
            _ids(self.loaded_models()),
            self.jobs_done(),
            available,
            healthy=healthy,
            batch_limits=self.batch_limits(),
        )
        if state is None:  # our row went away (or was stopped by someone else): put ourselves back
            self._register()
        else:
            self.state = state

    def _register(self) -> None:
        description, memory = self.device or describe_device(self.settings.device)
        info = WorkerInfo(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=description,
            memory_bytes=memory,
            loaded_models=_ids(self.loaded_models()),
            models_available=list(self.models_available()) if self.models_available else [],
            batch_limits=self.batch_limits(),
        )
        try:
            self.state = self.registry.register(info).state
        except Exception:  # the database is not there yet: the next beat tries again
            log.warning("worker %s could not register; will retry", self.worker_id, exc_info=True)
            self.state = None


def engine_batch_limits(engine: Any) -> list[dict[str, object]]:
    """The batch limits an engine has in force (`BatchLimits.rows`); none for an engine not built yet or without
    them (a remote engine: the remote's own workers batch)."""
    limits = getattr(engine, "batch_limits", None) if engine is not None else None
    return limits.rows() if limits is not None else []


def describe_device(device: str) -> tuple[str, int | None]:
    """("cuda:0 NVIDIA H100 80GB HBM3", total bytes) or ("cpu", RAM bytes). torch is imported only when a GPU may be
    meant (`auto`, `cuda*`) and the engine will import it anyway; `cpu` workers register without it.

    Always through `import`, never `sys.modules`: while another worker thread is still importing torch, its entry
    in `sys.modules` is a half-initialised module (no `torch.cuda` yet), whereas `import` waits for the import lock."""
    torch: Any = None
    if device.startswith(("cuda", "auto")):
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} {props.name}", int(props.total_memory)
    return ("cpu" if device == "auto" else device), _ram_bytes()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
