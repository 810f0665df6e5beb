"""`darkroom serve --api-processes N`: N processes answer the API on one listening socket.

Why: an API process is one interpreter. Under load its event loop (HTTP parsing, the ASGI stack, validation, the
answer) and its request threads share one GIL: measured on 2 cores with 16 clients submitting, the loop held it 61 %
of the time and the threads 39 %, about one core in all, whatever the machine has. More processes use more cores,
as API nodes on several machines do.

The process `serve` started (the primary) does everything it does alone: worker processes, webhooks, retention, the
sweeper, and its share of the requests. The others (replicas, `serve --listen-fd`) only answer requests, on the
primary's listening socket, which they inherit: the kernel hands each new connection to whichever process accepts
first, so a busy process takes fewer. Each process keeps its own auth caches, admission limit and change feed; the
job store is what they share, as with API nodes on several machines. On SQLite their writers queue on the database's
writer lock file (`jobs.db._WriterQueue`), so a second process costs no busy-handler sleeps; metrics go to the
primary's multiprocess folder (inherited, as worker processes do), so any process's `/metrics` shows them all. A
replica's `/readyz` cannot see the primary's worker processes; where there are some, it asks for a live worker in
the fleet instead (`observability.expect_workers`), as an API node whose workers run elsewhere does.

Supervision is the worker processes' (`darkroom.worker.processes`): a replica that exits is restarted after a
backoff that doubles per crash in a row, stopping sends SIGTERM (uvicorn finishes what it is answering) and kills
what is left, and a replica dies with the primary.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

from darkroom.config import Settings
from darkroom.worker.processes import PARENT_ENV, terminate
from darkroom.worker.supervisor import restart_backoff

log = logging.getLogger("darkroom.api")

STOP_SECONDS = 15.0  # uvicorn's graceful shutdown is 10 s
EXPECT_WORKERS_ENV = "DARKROOM_OBSERVABILITY__EXPECT_WORKERS"


def replica_command(settings: Settings, fd: int, log_level: str) -> list[str]:
    """`darkroom serve` for a replica: the primary's settings that came from flags, made explicit (the environment
    and darkroom.toml reach it as they reached the primary), no workers, and the socket to answer on."""
    server = settings.server
    args = [sys.executable, "-m", "darkroom.cli", "serve", "--listen-fd", str(fd), "--workers", "0"]
    args += ["--host", settings.host, "--port", str(settings.port), "--data-dir", str(settings.data_dir.resolve())]
    args += ["--database-url", settings.resolved_database_url, "--models-dir", str(settings.resolved_models_dir)]
    args += ["--threads", str(server.request_threads), "--max-in-flight", str(server.max_in_flight)]
    args += ["--log-level", log_level]
    if settings.security.insecure:
        args.append("--insecure")
    return args


class ApiReplicas:
    """Keeps `count` replicas alive on `sock` until `stop`."""

    def __init__(self, settings: Settings, sock: socket.socket, count: int, log_level: str = "info") -> None:
        self.settings = settings
        self.sock = sock
        self.count = count
        self.command = replica_command(settings, sock.fileno(), log_level)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> ApiReplicas:
        for index in range(self.count):
            # The thread that starts a child must outlive it: PR_SET_PDEATHSIG fires when that *thread* ends.
            thread = threading.Thread(target=self._keep, args=(index,), name=f"api-proc-{index + 1}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def _keep(self, index: int) -> None:
        streak = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                proc = subprocess.Popen(self.command, pass_fds=(self.sock.fileno(),), env=self._env())
            except OSError as exc:
                code = f"could not start: {exc}"
            else:
                with self._lock:
                    self.procs[index] = proc
                log.info("API process %d started (pid %d)", index + 1, proc.pid)
                code = f"exit code {proc.wait()}"
                if self._stop.is_set():
                    break
            streak, delay = restart_backoff(self.settings.recovery, streak, started)
            log.error("API process %d ended (%s); restarting in %.1f s", index + 1, code, delay)
            self._stop.wait(delay)

    def _env(self) -> dict[str, str]:
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        if self.settings.workers > 0:  # /readyz: the primary's workers are not the replica's own; the fleet is
            env[EXPECT_WORKERS_ENV] = "true"
        return env

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            procs = [p for p in self.procs if p is not None and p.poll() is None]
        terminate(procs, STOP_SECONDS, "API process")
        for thread in self._threads:
            thread.join(timeout=5)
