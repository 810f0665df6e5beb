"""`darkroom serve --workers N` runs its N workers as child processes (`darkroom worker`), supervised from here.

Why processes and not threads: a worker denoising in the API's process holds the GIL for most of every step (a
diffusion loop is Python launching kernels), so request threads, the event loop and health probes queue behind it.
Measured on a 2-core machine with the tiny model: with the worker as a thread, 200 clients saw `/healthz` p99 near
1 s and accepted submits p50 4.6 s. In its own process the worker has its own interpreter, and the API answers from
a core of its own. The job store is the only thing they share, as with workers on other machines: the change feed
wakes each side on the other's commits (`PRAGMA data_version` on SQLite, LISTEN/NOTIFY on PostgreSQL).

Each slot keeps one child alive: when it exits without being asked to, the exit is logged, the slot shows as
`restarting` (in `/readyz` and, through the workers table, the fleet view) and a new child starts after a backoff
that doubles per crash in a row (`recovery.restart_backoff_seconds` … `max_backoff_seconds`), as for worker threads
(`darkroom.worker.supervisor`). Stopping sends SIGTERM (the child drains: its running job gets `drain_seconds`) and
kills what is left after that. A child asks the kernel to kill it if the `serve` process dies (`die_with_parent`), so
a killed server leaves no orphan workers holding leases.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from darkroom.config import Settings
from darkroom.jobs.workers import WorkerRegistry
from darkroom.worker.supervisor import fleet_health, restart_backoff

log = logging.getLogger("darkroom.worker")

PARENT_ENV = "DARKROOM_WORKER_PARENT"  # set for a child: the pid of the serve process it belongs to
_PR_SET_PDEATHSIG = 1


@dataclass
class ProcessSlot:
    index: int
    worker_id: str
    device: str | None = None  # pinned to this device (`serve --devices`); None: the settings' device
    threads: int = 1  # worker loops in the process, sharing its engine (`darkroom worker --threads`)
    proc: subprocess.Popen[bytes] | None = None
    state: str = "starting"  # starting | running | restarting | stopped
    crashes: int = 0
    last_error: str | None = None
    started_at: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.state == "running" and self.proc is not None and self.proc.poll() is None


class WorkerProcesses:
    def __init__(self, settings: Settings, registry: WorkerRegistry, log_level: str = "info") -> None:
        self.settings = settings
        self.registry = registry
        self.log_level = log_level
        self.slots: list[ProcessSlot] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self, count: int, base_id: str) -> None:
        for device, threads in placement(count, self.settings.devices):
            slot = ProcessSlot(len(self.slots), f"{base_id}-{len(self.slots)}", device=device, threads=threads)
            with self._lock:
                self.slots.append(slot)
            # The thread that starts a child must outlive it: PR_SET_PDEATHSIG fires when that *thread* ends.
            thread = threading.Thread(target=self._keep, args=(slot,), name=f"worker-proc-{slot.index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def command(self, slot: ProcessSlot) -> list[str]:
        s = self.settings
        args = [sys.executable, "-m", "darkroom.cli", "worker", "--worker-id", slot.worker_id]
        args += ["--data-dir", str(s.data_dir.resolve()), "--database-url", s.resolved_database_url]
        args += ["--models-dir", str(s.resolved_models_dir), "--log-level", self.log_level]
        if slot.device is not None:
            args += ["--device", slot.device]
        if slot.threads > 1:
            args += ["--threads", str(slot.threads)]
        return args

    def _keep(self, slot: ProcessSlot) -> None:
        """A slot's thread: start its child, wait for it, restart it with backoff until `stop`."""
        streak = 0
        while not self._stop.is_set():
            env = {**os.environ, PARENT_ENV: str(os.getpid())}
            try:
                proc = subprocess.Popen(self.command(slot), env=env)
            except OSError as exc:
                code = f"could not start: {exc}"
            else:
                with self._lock:
                    slot.proc, slot.state, slot.started_at = proc, "running", time.monotonic()
                log.info("worker process %s started (pid %d)", slot.worker_id, proc.pid)
                code = f"exit code {proc.wait()}"
                if self._stop.is_set():
                    break
            streak, delay = restart_backoff(self.settings.recovery, streak, slot.started_at)
            with self._lock:
                slot.state, slot.crashes, slot.last_error = "restarting", slot.crashes + 1, code
            log.error("worker process %s ended (%s); restarting in %.1f s", slot.worker_id, code, delay)
            try:
                self.registry.mark_unhealthy(slot.worker_id)
            except Exception:  # the database may be what failed; the log line above is the record then
                log.warning("could not mark worker %s unhealthy", slot.worker_id, exc_info=True)
            self._stop.wait(delay)
        with self._lock:
            slot.state = "stopped"

    def stop(self) -> None:
        """Drain: SIGTERM every child (its running job gets `drain_seconds`), then kill what is still there."""
        self._stop.set()
        with self._lock:
            procs = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        terminate(procs, self.settings.drain_seconds + 10, "worker process")
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def health(self) -> dict[str, object]:
        """The same shape as the thread supervisor's: ok while one child is running."""
        with self._lock:
            slots = list(self.slots)
        views: list[dict[str, object]] = [
            {
                "id": s.worker_id,
                "state": s.state,
                "pid": s.proc.pid if s.proc is not None else None,
                "crashes": s.crashes,
                "last_error": s.last_error,
            }
            for s in slots
        ]
        return fleet_health(views, healthy=sum(s.healthy for s in slots))


def terminate(procs: list[subprocess.Popen[bytes]], seconds: float, what: str) -> None:
    """SIGTERM every child, wait up to `seconds` in all, then kill what is still there."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s %d did not stop in time; killing it", what, proc.pid)
            proc.kill()
            proc.wait()


def placement(workers: int, devices: list[str]) -> list[tuple[str | None, int]]:
    """(device, worker threads) for each process to start. Without devices, a process per worker on the settings'
    device (on a CPU, processes are what run side by side). With devices, a process per device holding one engine,
    and the workers dealt out to them as threads: a device never holds a model twice."""
    if workers <= 0:
        return []
    if not devices:
        return [(None, 1)] * workers
    used = devices[:workers]
    return [(device, len(range(i, workers, len(used)))) for i, device in enumerate(used)]


def resolve_devices(devices: list[str]) -> list[str]:
    """`all` is every CUDA device of this machine (the CPU when there is none); other names pass as given."""
    if devices != ["all"]:
        return devices
    import torch  # the worker extra: only a node that runs workers asks

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def die_with_parent() -> None:
    """In a child of `serve` (PARENT_ENV set): ask Linux to SIGKILL this process when the parent dies, as a worker
    thread dies with its process. If the parent is already gone (it died before this ran), exit now."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot ask to die with the serve process; a killed server may leave this worker running")
        return
    if os.getppid() != int(parent):
        os._exit(1)
