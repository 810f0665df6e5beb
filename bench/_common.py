"""What the service benchmarks share: server processes on loopback, their CPU and memory from /proc, percentiles.

CPU and RSS are read from /proc (Linux) rather than through a library so that the numbers are exactly the kernel's
per-process accounting: utime + stime of the server process and its descendants, all threads included.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


_T0 = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON), so a long run shows where its time goes."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def git_commit() -> str | None:
    """The commit measured: `BENCH_COMMIT` when the tree is a copy without .git (a `git archive` of a commit)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return rev.stdout.strip() or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def bench_env(omp_threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The same thread settings for every server under test, so neither gets more cores than the other."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(omp_threads),
        "MKL_NUM_THREADS": str(omp_threads),
        **(extra or {}),
    }


def ensure_model(models_dir: Path) -> Path:
    """The tiny random-weight SD pipeline darkroom builds for a fresh install: reused when already there."""
    from darkroom.models.smoke import SMOKE_MODEL_DIRNAME, ensure_smoke_model

    ensure_smoke_model(models_dir)
    model = models_dir / SMOKE_MODEL_DIRNAME
    if not model.is_dir():
        raise SystemExit(
            f"{models_dir} holds other models: give the benchmarks a folder of their own (or an empty one)"
        )
    return model


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no samples, so an empty phase never reads as 0 ms."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def latency_summary(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "count": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p95_ms": ms(percentile(values, 95)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values) if values else None),
    }


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process tree (fields 14 and 15 of /proc/<pid>/stat, after the command name)."""
    total = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    total = 0
    for p in descendants(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total


async def loop_lag(deadline: float, every: float = 0.05) -> list[float]:
    """How late this event loop wakes up (seconds over `every`) until `deadline`: when the client itself is
    saturated, its latencies include this lag, so the reports show it beside them."""
    import asyncio

    lags: list[float] = []
    while time.monotonic() < deadline:
        started = time.monotonic()
        await asyncio.sleep(every)
        lags.append(max(0.0, time.monotonic() - started - every))
    return lags


class Server:
    """A server under test: a child process on a loopback port, its output in a log file, stopped with SIGTERM."""

    def __init__(self, name: str, args: list[str], port: int, log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log = log_dir / f"{name}.log"
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_ready(self, path: str = "/healthz", timeout: float = 300.0) -> float:
        """Seconds until `path` answers 200; raises with the server's log if it dies or never does."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def tail(self, chars: int = 4000) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._fh.close()


def darkroom_server(
    name: str,
    data_dir: Path,
    models_dir: Path | None,
    workers: int,
    log_dir: Path,
    env: dict[str, str],
) -> Server:
    """`darkroom serve` on a free loopback port, watermark and C2PA as by default. The benchmark's models are its
    own, built beside the server: approved on first sight (by default a new file waits for an operator)."""
    env = {"DARKROOM_SECURITY__APPROVE_FIRST_SEEN_MODELS": "true", **env}
    port = free_port()
    args = [str(BIN / "darkroom"), "serve", "--host", HOST, "--port", str(port), "--data-dir", str(data_dir)]
    args += ["--workers", str(workers), "--log-level", "warning"]
    if models_dir is not None:
        args += ["--models-dir", str(models_dir)]
    return Server(name, args, port, log_dir, env)


def plain_server(name: str, model: Path, log_dir: Path, env: dict[str, str]) -> Server:
    port = free_port()
    script = Path(__file__).resolve().parent / "plain_server.py"
    args = [sys.executable, str(script), "--model", str(model), "--host", HOST, "--port", str(port)]
    return Server(name, args, port, log_dir, env)
