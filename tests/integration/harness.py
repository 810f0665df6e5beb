"""Real processes for integration tests: `darkroom serve` and `darkroom worker` over loopback HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

DARKROOM = str(Path(sys.executable).parent / "darkroom")

FAST_LEASES = {
    "DARKROOM_LEASE_SECONDS": "3",
    "DARKROOM_HEARTBEAT_SECONDS": "0.5",
    "DARKROOM_POLL_SECONDS": "0.1",
    "DARKROOM_PROGRESS_INTERVAL": "0",
    # A stopped worker gives unfinished jobs back after this, not the 30 s default: every fixture teardown SIGTERMs its
    # workers, and Proc.stop would otherwise wait out a long drain (then SIGKILL) whenever a job was still running.
    "DARKROOM_DRAIN_SECONDS": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output goes to a log file that failing tests print."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
        self.popen = subprocess.Popen(args, stdout=self.fh, stderr=subprocess.STDOUT, env=full_env)
        self.terminated = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        self.fh.flush()
        return self.log.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            self.terminated = self.terminated or sig == signal.SIGTERM

    def stop(self, timeout: float = 20) -> int | None:
        if self.alive():
            if not self.terminated:  # once: a second SIGTERM is not a politer request
                self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.fh.close()
        return self.popen.returncode


def wait_until(predicate, timeout: float = 60, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Cluster:
    """One `darkroom serve` and any number of `darkroom worker` processes sharing a data dir and database."""

    def __init__(self, tmp: Path, models_dir: Path | None, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.env = {"DARKROOM_DATA_DIR": str(self.data_dir), **FAST_LEASES, **(env or {})}
        if models_dir is not None:
            self.env["DARKROOM_MODELS_DIR"] = str(models_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.server: Proc | None = None

    def start_server(self, workers: int = 0) -> Proc:
        args = [DARKROOM, "serve", "--port", str(self.port), "--workers", str(workers), "--log-level", "warning"]
        self.server = self._spawn(args, "server")
        wait_until(self._healthy, timeout=120, what=f"server on {self.url}\n{self.server.output()}")
        return self.server

    def start_worker(self, name: str) -> Proc:
        return self._spawn([DARKROOM, "worker", "--worker-id", name], name)

    def _spawn(self, args: list[str], name: str) -> Proc:
        proc = Proc(args, self.tmp / f"{name}.log", self.env)
        self.procs.append(proc)
        return proc

    def _healthy(self) -> bool:
        if self.server is not None and not self.server.alive():
            raise AssertionError(f"server exited:\n{self.server.output()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-4000:]}" for p in self.procs)

    def close(self) -> None:
        # SIGTERM every process first, then wait for each: a worker takes seconds to exit (its drain, then torch's
        # teardown), and stopping them one after another made a cluster of several workers cost that many times over.
        for proc in reversed(self.procs):
            proc.kill(signal.SIGTERM)
        for proc in reversed(self.procs):
            proc.stop()
