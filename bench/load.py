"""The load battery: many clients submitting and polling at once for a bounded time, and how the service holds up.

Each of `--clients` clients loops until `--seconds` have passed: submit a small job (`POST /v1/jobs`), then read one
of its own unfinished jobs (`GET /v1/jobs/{id}`), then submit again, with no think time. A 429 is honoured: the
client sleeps for its `Retry-After` (what a well-behaved client does; the SDK does the same). Meanwhile a probe
process of its own reads `/healthz` every `--health-every` seconds and samples the server's RSS and CPU every second
when its pid is known (a server this script starts, or `--pid`). Reports p50/p95/p99 of submits (accepted and
refused apart) and polls, jobs accepted per second, 429 and 5xx counts, `/healthz` latency, memory over time, and
the clients' own event-loop lag (latencies measured by a saturated client include it), as JSON. Each client speaks
HTTP on a keep-alive connection of its own through `bench/rawhttp.py` (about a tenth of httpx's CPU per request), and
more than `--clients-per-process` clients run in load processes of their own, so the load generator is not what is
measured.

    .venv/bin/python bench/load.py                          # starts `darkroom serve` (1 worker) in a temp dir
The server it starts gets its first image (a one-step job) before the clients start, so the run measures the service
running, not its worker's start-up (imports and model load: seconds of one core); that time is `first_image_s`.
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --api-key dk_... --pid 1234
Traffic goes to loopback only unless `--url` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import rawhttp  # noqa: E402
from _common import (  # noqa: E402
    bench_env,
    cpu_seconds,
    darkroom_server,
    ensure_model,
    git_commit,
    latency_summary,
    loop_lag,
    rss_bytes,
)

TERMINAL = {"succeeded", "failed", "cancelled", "dead"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running darkroom; default: start one on loopback in a temp dir")
    p.add_argument("--api-key", default=os.environ.get("DARKROOM_API_KEY"))
    p.add_argument("--pid", type=int, help="the running server's pid, to sample its memory and CPU")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--steps", type=int, default=4, help="denoising steps of each job (64x64)")
    p.add_argument("--health-every", type=float, default=0.1, help="seconds between /healthz reads")
    p.add_argument("--workers", type=int, default=1, help="started server: in-process workers")
    p.add_argument("--omp-threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--models-dir", type=Path, help="started server: reuse (or build once) the tiny model here")
    p.add_argument("--request-timeout", type=float, default=60.0, help="a request slower than this is an error")
    p.add_argument(
        "--clients-per-process",
        type=int,
        default=50,
        help="at most this many clients share one load process: one asyncio loop driving 200 clients lagged 49 ms "
        "at p50, so the latencies it reported were mostly its own",
    )
    return p.parse_args(argv)


@dataclass
class Tally:
    """What every client saw; asyncio runs them on one thread, so plain lists and counters are safe."""

    submit_ok: list[float] = field(default_factory=list)
    submit_refused: list[float] = field(default_factory=list)
    polls: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    retry_after_missing: int = 0
    finished_seen: int = 0

    def status(self, route: str, code: int | str) -> None:
        key = f"{route} {code}"
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def count(self, predicate: Any) -> int:
        return sum(n for key, n in self.statuses.items() if predicate(key.split(" ", 1)[1]))

    def merge(self, other: Tally) -> None:
        self.submit_ok += other.submit_ok
        self.submit_refused += other.submit_refused
        self.polls += other.polls
        for key, n in other.statuses.items():
            self.statuses[key] = self.statuses.get(key, 0) + n
        self.retry_after_missing += other.retry_after_missing
        self.finished_seen += other.finished_seen


def job_body(client: int, i: int, steps: int) -> dict[str, Any]:
    return {"prompt": f"load {client}-{i}", "width": 64, "height": 64, "steps": steps, "seed": client * 100_000 + i}


def retry_after(response: rawhttp.Response, tally: Tally) -> float:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else _missing(tally)
    except ValueError:  # an HTTP date: not what darkroom sends, but a client must still back off
        return 1.0


def _missing(tally: Tally) -> float:
    tally.retry_after_missing += 1
    return 1.0


TRANSPORT_ERRORS = (OSError, TimeoutError, rawhttp.ProtocolError)


async def client_loop(n: int, http: Http, tally: Tally, deadline: float, steps: int) -> None:
    mine: list[str] = []
    i = 0
    while time.monotonic() < deadline:
        i += 1
        payload = json.dumps(job_body(n, i, steps)).encode()
        started = time.perf_counter()
        try:
            r = await http.request("POST", "/v1/jobs", payload)
        except TRANSPORT_ERRORS as exc:
            tally.status("submit", type(exc).__name__)
            continue
        elapsed = time.perf_counter() - started
        tally.status("submit", r.status)
        if r.status in (200, 202):
            tally.submit_ok.append(elapsed)
            mine.append(json.loads(r.body)["id"])
        elif r.status == 429:
            tally.submit_refused.append(elapsed)
            await asyncio.sleep(min(retry_after(r, tally), max(0.0, deadline - time.monotonic())))
        if mine and time.monotonic() < deadline:
            await poll_one(http, tally, mine)


async def poll_one(http: Http, tally: Tally, mine: list[str]) -> None:
    """Read the oldest of the client's unfinished jobs, as a client waiting for its results does."""
    job_id = mine[0]
    started = time.perf_counter()
    try:
        r = await http.request("GET", f"/v1/jobs/{job_id}")
    except TRANSPORT_ERRORS as exc:
        tally.status("poll", type(exc).__name__)
        return
    tally.status("poll", r.status)
    if r.status == 200:
        tally.polls.append(time.perf_counter() - started)
        if json.loads(r.body).get("state") in TERMINAL:
            tally.finished_seen += 1
            mine.pop(0)
    elif r.status == 429:
        await asyncio.sleep(min(retry_after(r, tally), 5.0))


class Http:
    """A client's own keep-alive connection (`bench/rawhttp.py`: a tenth of httpx's CPU per request, so the load
    processes leave the machine to the server), each request bounded by `--request-timeout`."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        parsed = httpx.URL(url)
        self.conn = rawhttp.Connection(parsed.host, parsed.port or 80, headers)
        self.timeout = timeout

    async def request(self, method: str, path: str, body: bytes = b"") -> rawhttp.Response:
        return await asyncio.wait_for(self.conn.request(method, path, body), self.timeout)


def probe(url: str, pid: int | None, deadline_in: float, every: float, timeout: float, out: Any) -> None:
    """`/healthz` every `every` s and the server's RSS and CPU every second, from a process of its own: the
    clients' event loop is saturated on purpose, and a probe sharing it would measure the client's lag."""
    deadline = time.monotonic() + deadline_in
    health, failures, samples = [], {}, []
    t0 = time.monotonic()
    cpu0 = cpu_seconds(pid) if pid else 0.0
    next_sample = t0
    with httpx.Client(base_url=url, timeout=timeout) as http:
        while time.monotonic() < deadline:
            started = time.monotonic()
            if pid and started >= next_sample:
                rss = round(rss_bytes(pid) / 2**20, 1)
                samples.append({"t_s": round(started - t0, 1), "rss_mb": rss, "cpu_s": cpu_seconds(pid) - cpu0})
                next_sample += 1.0
            try:
                r = http.get("/healthz")
                if r.status_code == 200:
                    health.append(time.monotonic() - started)
                else:
                    failures[str(r.status_code)] = failures.get(str(r.status_code), 0) + 1
            except httpx.TransportError as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            time.sleep(max(0.0, min(every - (time.monotonic() - started), deadline - time.monotonic())))
    if pid:
        samples.append(
            {
                "t_s": round(time.monotonic() - t0, 1),
                "rss_mb": round(rss_bytes(pid) / 2**20, 1),
                "cpu_s": cpu_seconds(pid) - cpu0,
            }
        )
    out.put({"health": health, "failures": failures, "samples": samples})


async def clients(url: str, args: argparse.Namespace, first: int, count: int) -> dict[str, Any]:
    """Clients `first` … `first + count - 1` until `args.seconds` have passed, in this process: their tally, the
    event loop's lag, and this process's CPU."""
    tally = Tally()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client_cpu0 = time.process_time()
    conns = [Http(url, headers, args.request_timeout) for _ in range(count)]
    started = time.monotonic()
    deadline = started + args.seconds
    try:
        *_, lags = await asyncio.gather(
            *(client_loop(n, conns[n - first], tally, deadline, args.steps) for n in range(first, first + count)),
            loop_lag(deadline),
        )
    finally:
        for http in conns:
            await http.conn.close()
    wall = time.monotonic() - started
    # Plain data: a load process's classes would not unpickle in this one.
    return {"tally": asdict(tally), "lags": lags, "wall": wall, "cpu_s": time.process_time() - client_cpu0}


def client_process(url: str, args: argparse.Namespace, first: int, count: int, out: Any) -> None:
    out.put(asyncio.run(clients(url, args, first, count)))


async def run_load(url: str, args: argparse.Namespace, pid: int | None) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    prober = ctx.Process(
        target=probe, args=(url, pid, args.seconds, args.health_every, args.request_timeout, results), daemon=True
    )
    prober.start()
    per = max(1, args.clients_per_process)
    if args.clients <= per:
        shares = [await clients(url, args, 0, args.clients)]
    else:  # more clients than one loop drives without queueing them itself: load processes of their own
        loads = ctx.Queue()
        spread = [
            ctx.Process(target=client_process, args=(url, args, first, min(per, args.clients - first), loads))
            for first in range(0, args.clients, per)
        ]
        for process in spread:
            process.start()
        wait = args.seconds + args.request_timeout + 60
        shares = [await asyncio.to_thread(loads.get, True, wait) for _ in spread]
        for process in spread:
            process.join(30)
    tally = Tally()
    for share in shares:
        tally.merge(Tally(**share["tally"]))
    lags = [lag for share in shares for lag in share["lags"]]
    wall = max(share["wall"] for share in shares)
    probed = await asyncio.to_thread(results.get, True, args.request_timeout + 30)
    prober.join(30)
    tally.health = probed["health"]
    for code, n in probed["failures"].items():
        tally.statuses[f"healthz {code}"] = n
    tally.statuses["healthz 200"] = len(probed["health"])
    out = report(tally, probed["samples"], wall, lags)
    out["load_processes"] = len(shares) if args.clients > per else 1
    out["client_cpu_s"] = round(sum(share["cpu_s"] for share in shares), 2)  # the clients' share of the machine
    return out


def report(tally: Tally, samples: list[dict[str, float]], wall: float, lags: list[float]) -> dict[str, Any]:
    rss = [s["rss_mb"] for s in samples]
    return {
        "wall_s": round(wall, 2),
        "jobs_accepted": len(tally.submit_ok),
        "jobs_accepted_per_s": round(len(tally.submit_ok) / wall, 2),
        "jobs_seen_finished": tally.finished_seen,
        "submit_accepted": latency_summary(tally.submit_ok),
        "submit_429": latency_summary(tally.submit_refused),
        "poll": latency_summary(tally.polls),
        "healthz": latency_summary(tally.health),
        "client_loop_lag": latency_summary(lags),
        "count_429": tally.count(lambda code: code == "429"),
        "count_5xx": tally.count(lambda code: code.isdigit() and code.startswith("5")),
        "transport_errors": tally.count(lambda code: not code.isdigit()),
        "retry_after_missing": tally.retry_after_missing,
        "statuses": dict(sorted(tally.statuses.items())),
        "server": {
            "rss_mb_start": rss[0] if rss else None,
            "rss_mb_max": max(rss) if rss else None,
            "rss_mb_end": rss[-1] if rss else None,
            "cpu_s": round(samples[-1]["cpu_s"], 2) if samples else None,
            "samples": [{**s, "cpu_s": round(s["cpu_s"], 2)} for s in samples],
        },
    }


def first_image(url: str) -> float:
    """Seconds until a one-step image comes back: the worker has started and loaded the model."""
    started = time.monotonic()
    response = httpx.post(url + "/v1/generate", json=job_body(0, 0, 1), timeout=600)
    response.raise_for_status()
    return time.monotonic() - started


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    head: dict[str, Any] = {
        "benchmark": "load",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"},
    }
    if args.url:
        return {**head, "target": args.url, **(await run_load(args.url, args, args.pid))}
    with tempfile.TemporaryDirectory(prefix="darkroom-load-") as tmp:
        work = Path(tmp)
        models_dir = args.models_dir or work / "models"
        ensure_model(models_dir)
        env = bench_env(args.omp_threads)
        server = darkroom_server("darkroom", work / "data", models_dir, args.workers, work, env)
        try:
            head["ready_s"] = round(server.wait_ready(), 2)
            if args.workers:  # the load meets a running service, not its workers' start (imports, model load)
                head["first_image_s"] = round(first_image(server.url), 2)
            head["target"] = f"darkroom serve --workers {args.workers} (default settings, SQLite, started here)"
            result = await run_load(server.url, args, server.pid)
        except Exception:
            sys.stderr.write(server.tail())
            raise
        finally:
            server.stop()
    return {**head, **result}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    json.dump(asyncio.run(main_async(args)), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
