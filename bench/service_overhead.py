"""What darkroom costs on top of the work it schedules, measured against the server people would otherwise write.

Both servers run as their own processes on loopback with the same tiny SD model folder, the same OMP_NUM_THREADS and
the same request defaults: `bench/plain_server.py` (FastAPI + one diffusers pipeline behind an asyncio lock) and
`darkroom serve` (SQLite in a temp data dir, watermark and C2PA as by default) with 1 and 2 worker threads. The rounds
interleave the servers (the order flips every round) and the medians over rounds are reported, so machine noise hits
every side alike. Phases, each bounded by `--phase-timeout`:

- latency: one client, sequential, `--steps` steps at 64²: plain `POST /generate` (PNG bytes) against darkroom's
  native sync `POST /v1/generate` with `Accept: image/png` (the PNG bytes too: a client wants the picture);
  the two servers alternate request by request, and the median ratio of each pair is reported beside the ratio of
  the medians;
- throughput: `--clients` concurrent clients, `--jobs` images of `--tput-steps` steps: plain `POST /generate` against
  darkroom's SDK (`AsyncClient`: `POST /v1/jobs`, follow the job's SSE stream, read the job, download the image),
  with 1 and 2 workers; server CPU per image (utime + stime from /proc over the phase) for both; `--attribution`
  adds darkroom with watermark and C2PA off, and darkroom waited on through `POST /v1/generate` instead of SSE;
- sql: statements and transactions per `POST /v1/jobs` and `GET /v1/jobs/{id}`, counted in this process with a
  SQLAlchemy cursor event on the store's engine around the real app served over loopback (the service itself
  exposes no statement count); only statements run for requests are counted (request threads, and the thread that
  commits the submits joined from the event loop), not background loops';
- submit: an API-only node (`--workers 0`, `--api-processes` processes answering) with `--queued` jobs (and 100,000
  with `--deep`) of 50 other tenants already queued, `--submit-clients` clients submitting for `--submit-seconds`:
  p50/p99, submits/s, 429s. The clients speak HTTP through `bench/rawhttp.py` (one keep-alive connection each, about
  a tenth of httpx's CPU per request), and more than `--clients-per-process` of them are spread over load processes,
  so the load generator is not what is measured.

    OMP_NUM_THREADS=1 .venv/bin/python bench/service_overhead.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The sql and submit phases open services in this process on the bench's own model: approved on first sight, as
# bench/_common.py does for the servers it starts (by default a new file waits for an operator, and submits get 409).
os.environ.setdefault("DARKROOM_SECURITY__APPROVE_FIRST_SEEN_MODELS", "true")

import httpx  # noqa: E402
import rawhttp  # noqa: E402
from _common import (  # noqa: E402
    HOST,
    Server,
    bench_env,
    darkroom_server,
    ensure_model,
    free_port,
    git_commit,
    latency_summary,
    log,
    loop_lag,
    median,
    ms,
    plain_server,
    ratio,
)

PHASES = ("latency", "throughput", "sql", "submit")
DEEP_QUEUE = 100_000
STORE_PREFILL = 2_000
PREFILL_TENANTS = 50  # the queue belongs to other tenants (the submitting one may queue as many as the node)


def body(i: int, steps: int, size: int = 64) -> dict[str, Any]:
    return {"prompt": f"a lighthouse at dusk {i}", "steps": steps, "width": size, "height": size, "seed": i}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="latency phase: denoising steps")
    p.add_argument("--seq-requests", type=int, default=8, help="latency phase: requests per server per round")
    p.add_argument("--clients", type=int, default=16, help="throughput phase: concurrent clients")
    p.add_argument("--jobs", type=int, default=64, help="throughput phase: images per server per round")
    p.add_argument("--tput-steps", type=int, default=4, help="throughput phase: denoising steps")
    p.add_argument("--sql-requests", type=int, default=20, help="sql phase: requests of each kind")
    p.add_argument("--submit-clients", default="16,200", help="submit phase: comma-separated client counts")
    p.add_argument("--submit-seconds", type=float, default=10.0, help="submit phase: seconds per client count")
    p.add_argument(
        "--clients-per-process",
        type=int,
        default=50,
        help="submit phase: at most this many clients share one load process (one asyncio loop and httpx pool with "
        "200 clients measured its own queueing: p50 1 s where the server answered in 21 ms)",
    )
    p.add_argument(
        "--submit-rates",
        default="",
        help="submit phase: comma-separated offered rates (submits/s, all clients together): after each closed-loop "
        "run, the same clients submit on a fixed schedule at each rate, latency counted from each submit's slot",
    )
    p.add_argument("--queued", type=int, default=1000, help="submit phase: jobs queued before it starts")
    p.add_argument("--deep", action="store_true", help="submit phase: also with --deep-queued jobs queued")
    p.add_argument("--deep-queued", type=int, default=DEEP_QUEUE)
    p.add_argument(
        "--api-processes", type=int, default=1, help="submit phase: processes answering the API (serve --api-processes)"
    )
    p.add_argument("--omp-threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--phase-timeout", type=float, default=300.0, help="seconds any one measured phase may take")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument(
        "--attribution",
        action="store_true",
        help="throughput phase: also darkroom (1 worker) with watermark and C2PA off, and waited on through the sync"
        " route instead of SSE, to attribute the costs",
    )
    p.add_argument("--models-dir", type=Path, help="reuse (or build once) the tiny model here; default: a temp dir")
    return p.parse_args(argv)


async def bounded(coro: Awaitable[dict[str, Any]], timeout: float) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        return {"timed_out": True}


# --- latency ---------------------------------------------------------------------------------------------------------


async def one_plain(http: httpx.AsyncClient, i: int, steps: int) -> float:
    started = time.perf_counter()
    (await http.post("/generate", json=body(i, steps))).raise_for_status()
    return time.perf_counter() - started


async def one_darkroom(http: httpx.AsyncClient, i: int, steps: int) -> float:
    started = time.perf_counter()
    r = await http.post("/v1/generate", json=body(i, steps), headers={"Accept": "image/png"})
    r.raise_for_status()
    if r.headers["content-type"] != "image/png":
        job = r.json()
        raise RuntimeError(f"darkroom job ended {job['state']}: {job.get('error')}")
    return time.perf_counter() - started


async def sequential(server: Server, n: int, steps: int) -> list[float]:
    one = one_plain if server.name == "plain" else one_darkroom
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        return [await one(http, i, steps) for i in range(n)]


async def pairs(plain: Server, darkroom: Server, n: int, steps: int) -> dict[str, list[float]]:
    """`n` requests to each, alternating request by request (who goes first flips each pair), so both see the same
    machine: on a shared box the load moves within seconds, and per-server blocks would measure it, not the servers."""
    out: dict[str, list[float]] = {"plain": [], "darkroom": [], "pair_ratio": []}
    async with (
        httpx.AsyncClient(base_url=plain.url, timeout=120) as p,
        httpx.AsyncClient(base_url=darkroom.url, timeout=120) as d,
    ):
        for i in range(n):
            if i % 2:
                t_plain, t_dark = await one_plain(p, i, steps), await one_darkroom(d, i, steps)
            else:
                t_dark, t_plain = await one_darkroom(d, i, steps), await one_plain(p, i, steps)
            out["plain"].append(t_plain)
            out["darkroom"].append(t_dark)
            out["pair_ratio"].append(t_dark / t_plain)
    return out


# --- throughput ------------------------------------------------------------------------------------------------------


async def fan_out(clients: int, jobs: int, one: Callable[[int], Awaitable[None]]) -> float:
    """`jobs` calls of `one` spread over `clients` concurrent tasks; returns the wall time."""
    counter = iter(range(jobs))

    async def client() -> None:
        for i in counter:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started


async def tput_plain(server: Server, clients: int, jobs: int, steps: int) -> float:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as http:

        async def one(i: int) -> None:
            (await http.post("/generate", json=body(i, steps))).raise_for_status()

        return await fan_out(clients, jobs, one)


async def tput_darkroom(server: Server, clients: int, jobs: int, steps: int) -> float:
    from darkroom.client import AsyncClient

    async with AsyncClient(server.url, timeout=600) as sdk:

        async def one(i: int) -> None:
            job = await sdk.generate(body(i, steps))
            await sdk.image(job["images"][0]["url"])

        return await fan_out(clients, jobs, one)


async def tput_darkroom_sync(server: Server, clients: int, jobs: int, steps: int) -> float:
    """The other way a client waits: the sync route (`POST /v1/generate`) and the download, no SSE."""
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as http:

        async def one(i: int) -> None:
            await one_darkroom(http, i, steps)

        return await fan_out(clients, jobs, one)


SYNC_CLIENTS = "darkroom_1w_sync_generate"  # --attribution: darkroom_1w's server, waited on with /v1/generate


async def measured(server: Server, work: Awaitable[Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, server CPU seconds) of one piece of client work."""
    cpu0, t0 = server.cpu(), time.perf_counter()
    result = await work
    return result, time.perf_counter() - t0, server.cpu() - cpu0


# --- sql -------------------------------------------------------------------------------------------------------------


class StatementCounter:
    """Counts the store engine's statements and transactions by the request threads of an in-process server (and the
    thread that commits the submits they join from the event loop)."""

    def __init__(self, engine: Any, request_threads: Callable[[threading.Thread], bool]) -> None:
        import sqlalchemy as sa

        self.request_threads = request_threads
        self.statements = self.transactions = self.writes = 0
        self.lock = threading.Lock()
        sa.event.listen(engine, "before_cursor_execute", self._statement)
        sa.event.listen(engine, "begin", self._begin)

    def _ours(self) -> bool:
        return self.request_threads(threading.current_thread())

    def _statement(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not self._ours():
            return
        head = statement.lstrip()[:16].upper()
        with self.lock:
            if head.startswith("BEGIN IMMEDIATE"):
                self.writes += 1
            elif not head.startswith(("BEGIN", "COMMIT", "ROLLBACK")):
                self.statements += 1

    def _begin(self, conn: Any) -> None:
        if self._ours():
            with self.lock:
                self.transactions += 1

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.statements, self.transactions, self.writes


def sql_phase(models_dir: Path, n: int) -> dict[str, Any]:
    import uvicorn

    from darkroom.api.app import create_app
    from darkroom.auth.principal import Principal, Role
    from darkroom.config import Settings
    from darkroom.jobs.group_commit import WRITER_THREAD
    from darkroom.service import Services

    with tempfile.TemporaryDirectory(prefix="darkroom-sql-") as tmp:
        settings = Settings(data_dir=Path(tmp), models_dir=models_dir, workers=0, create_default_model=False)
        settings.webhooks.enabled = False
        svc = Services.open(settings)
        _, token = svc.keys.create(Principal.cli(), name="bench", role=Role.service, tenant="default")
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(svc, workers=0), host=HOST, port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="bench-sql-server", daemon=True)
        counter = StatementCounter(
            svc.store.engine, lambda t: t is thread or t.name.startswith(("AnyIO worker", "anyio", WRITER_THREAD))
        )
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("in-process server did not start")
                time.sleep(0.02)
            counts = count_requests(f"http://{HOST}:{port}", token, counter, n)
            log(f"sql: {counts}")
            return counts
        finally:
            server.should_exit = True
            thread.join(30)
            svc.close()


def count_requests(url: str, token: str, counter: StatementCounter, n: int) -> dict[str, Any]:
    """Median statements per request after one warm-up of each kind (caches, prepared state)."""
    per: dict[str, list[tuple[int, int, int]]] = {"submit": [], "status": []}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        job_id = ""
        for i in range(n + 1):
            before = counter.snapshot()
            r = http.post("/v1/jobs", json=body(i, 4))
            r.raise_for_status()
            job_id = r.json()["id"]
            after = counter.snapshot()
            if i:
                per["submit"].append(tuple(a - b for a, b in zip(after, before, strict=True)))  # type: ignore[arg-type]
            before = counter.snapshot()
            http.get(f"/v1/jobs/{job_id}").raise_for_status()
            after = counter.snapshot()
            if i:
                per["status"].append(tuple(a - b for a, b in zip(after, before, strict=True)))  # type: ignore[arg-type]
    out: dict[str, Any] = {"counted": "in-process cursor events on the store engine, request threads only"}
    for kind, rows in per.items():
        out[kind] = {
            "statements": median([r[0] for r in rows]),
            "transactions": median([r[1] for r in rows]),
            "write_transactions": median([r[2] for r in rows]),
            "requests": len(rows),
        }
    return out


# --- submit ------------------------------------------------------------------------------------------------------


def prefill(data_dir: Path, models_dir: Path, count: int) -> dict[str, Any]:
    """`count` queued jobs of `PREFILL_TENANTS` other tenants: up to `STORE_PREFILL` through darkroom's own
    `JobStore.create` (every table it keeps in step stays so), the rest copied from those rows by bulk INSERT
    (100,000 single submits would take minutes)."""
    import sqlalchemy as sa

    from darkroom.clock import new_id
    from darkroom.config import Limits, Settings
    from darkroom.jobs.tables import jobs
    from darkroom.schemas import GenerationRequest
    from darkroom.service import Services

    limits = Limits(max_queue_depth=queue_limit(count), max_tenant_queue_depth=None)
    svc = Services.open(Settings(data_dir=data_dir, models_dir=models_dir, workers=0, limits=limits))
    started = time.perf_counter()
    try:
        model = svc.registry.default().id
        made = min(count, STORE_PREFILL)
        for i in range(made):
            request = GenerationRequest(prompt=f"queued {i}", width=64, height=64, steps=4, seed=i, model=model)
            svc.store.create(request, tenant=f"queued-{i % PREFILL_TENANTS}")
        with svc.store.engine.begin() as conn:
            template = dict(conn.execute(sa.select(jobs).order_by(jobs.c.fair_tag.desc()).limit(1)).one()._mapping)
            step = dt.timedelta(microseconds=1)
            for first in range(made, count, 5000):
                rows = [
                    {
                        **template,
                        "id": new_id("job"),
                        "tenant": f"queued-{i % PREFILL_TENANTS}",
                        "fair_tag": template["fair_tag"] + 1 + i - made,
                        "created_at": template["created_at"] + (i - made + 1) * step,
                    }
                    for i in range(first, min(count, first + 5000))
                ]
                conn.execute(jobs.insert(), rows)
            keep_counters_in_step(conn, count - made)
    finally:
        svc.close()
    return {"prefill_s": round(time.perf_counter() - started, 1), "via_store": made, "bulk_copied": count - made}


def keep_counters_in_step(conn: Any, added: int) -> None:
    """The store keeps the queue depth in maintained counter rows (`queue_counters`, summed); rows inserted behind
    its back must be added there too, or the depth limit and the figures would see a shallow queue."""
    import sqlalchemy as sa

    from darkroom.jobs import tables

    counters = getattr(tables, "queue_counters", None)
    if counters is None or not added:
        return
    shard = conn.execute(sa.select(sa.func.min(counters.c.shard))).scalar()
    if shard is None:
        conn.execute(counters.insert().values(shard=0, queued=added))
    else:
        conn.execute(counters.update().where(counters.c.shard == shard).values(queued=counters.c.queued + added))


def queue_limit(depth: int) -> int:
    """A service-wide depth limit that admits the pre-filled queue plus what the phase submits."""
    return max(10_000, depth + 20_000)


async def submit_load(
    url: str, clients: int, seconds: float, per_process: int = 0, rate: float = 0.0
) -> dict[str, Any]:
    """`clients` submitting for `seconds`; with more than `per_process` of them, spread over load processes of their
    own (this script again, `--load-client`), whose results are merged.

    `rate` 0: a closed loop, each client submitting again as soon as it has its answer, so the server runs flat out
    and a submit's latency is mostly its wait behind the others (16 clients at 340/s wait 47 ms on average, whatever
    the server does). A `rate` (submits/s, all clients together): an open loop, the k-th submit of the whole run due
    at k/rate, dealt to the clients in turn; its latency counts from when it was due, so a client held up by a slow
    answer is charged for the submits it sent late (no coordinated omission). What the server answers at a given
    load, rather than how long a queue of 16 takes to drain."""
    if per_process and clients > per_process:
        return await _spread_load(url, clients, seconds, per_process, rate)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    parsed = httpx.URL(url)
    began = time.perf_counter()

    async def client(c: int) -> None:
        conn = rawhttp.Connection(parsed.host, parsed.port or 80)
        i = 0
        try:
            while time.monotonic() < deadline:
                i += 1
                payload = json.dumps(body(c * 1_000_000 + i, 4)).encode()
                started = time.perf_counter()
                if rate:  # this client's i-th submit is the run's ((i - 1) * clients + c)-th
                    started = began + ((i - 1) * clients + c) / rate
                    if started >= began + seconds:
                        break
                    await asyncio.sleep(max(0.0, started - time.perf_counter()))
                try:
                    r = await conn.request("POST", "/v1/jobs", payload)
                except (OSError, rawhttp.ProtocolError) as exc:
                    statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                    continue
                statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
                if r.status == 202:
                    latencies.append(time.perf_counter() - started)
                elif r.status == 429:
                    wait = float(r.headers.get("retry-after", "1") or 1)
                    await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
        finally:
            await conn.close()

    client_cpu0 = time.process_time()
    started = time.perf_counter()
    *_, lags = await asyncio.gather(*(client(c) for c in range(clients)), loop_lag(deadline))
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "accepted_per_s": round(len(latencies) / wall, 1),
        "accepted": latency_summary(latencies),
        "statuses": statuses,
        "client_loop_lag": latency_summary(lags),
        "client_cpu_s": round(time.process_time() - client_cpu0, 2),
        "_latencies": latencies,
        "_lags": lags,
    }


async def _spread_load(url: str, clients: int, seconds: float, per_process: int, rate: float = 0.0) -> dict[str, Any]:
    shares = [per_process] * (clients // per_process) + ([clients % per_process] if clients % per_process else [])
    args = [sys.executable, __file__, "--load-client", url, str(seconds)]
    procs = [  # each process offers its share of the rate
        await asyncio.create_subprocess_exec(
            *args, str(n), str(rate * n / clients), stdout=asyncio.subprocess.PIPE, env=os.environ.copy()
        )
        for n in shares
    ]
    rows = [json.loads((await p.communicate())[0]) for p in procs]
    latencies = [v for r in rows for v in r["_latencies"]]
    statuses: dict[str, int] = {}
    for r in rows:
        for code, n in r["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    wall = max(r["seconds"] for r in rows)
    return {
        "clients": clients,
        "load_processes": len(shares),
        "seconds": wall,
        "accepted_per_s": round(len(latencies) / wall, 1),
        "accepted": latency_summary(latencies),
        "statuses": statuses,
        "client_loop_lag": latency_summary([v for r in rows for v in r["_lags"]]),
        "client_cpu_s": round(sum(r["client_cpu_s"] for r in rows), 2),
    }


async def submit_phase(args: argparse.Namespace, models_dir: Path, logs: Path) -> list[dict[str, Any]]:
    depths = [args.queued] + ([args.deep_queued] if args.deep else [])
    out: list[dict[str, Any]] = []
    for depth in depths:
        with tempfile.TemporaryDirectory(prefix="darkroom-api-") as tmp:
            fill = prefill(Path(tmp), models_dir, depth)
            log(f"submit: {depth} jobs queued ({fill})")
            limit = str(queue_limit(depth))
            # The submitting tenant may queue as many as the node: with its default limit (2,000) the 16-client
            # phase filled it, and the 200-client phase that follows measured nothing but `queue_full` 429s.
            env = bench_env(
                args.omp_threads,
                {
                    "DARKROOM_LIMITS__MAX_QUEUE_DEPTH": limit,
                    "DARKROOM_LIMITS__MAX_TENANT_QUEUE_DEPTH": limit,
                    "DARKROOM_SERVER__API_PROCESSES": str(args.api_processes),
                },
            )
            server = darkroom_server(f"api-only-{depth}", Path(tmp), models_dir, 0, logs, env)
            try:
                server.wait_ready()
                queued = depth
                rates = [0.0] + [float(r) for r in args.submit_rates.split(",") if r.strip()]
                for clients in [int(c) for c in args.submit_clients.split(",") if c.strip()]:
                    for rate in rates:
                        cpu0 = server.cpu()
                        load = submit_load(server.url, clients, args.submit_seconds, args.clients_per_process, rate)
                        row = await bounded(load, args.phase_timeout)
                        row.pop("_latencies", None), row.pop("_lags", None)
                        accepted = row.get("statuses", {}).get("202", 0)
                        row["server_cpu_ms_per_submit"] = ms((server.cpu() - cpu0) / accepted) if accepted else None
                        row["offered_per_s"] = rate or None  # None: closed loop
                        out.append({"queued_before": queued, "queue_limit": int(limit), **fill, **row})
                        offered = f" offered {rate:g}/s" if rate else ""
                        log(f"submit: {clients} clients{offered} at {queued} queued: {row.get('accepted')}")
                        queued += accepted
            finally:
                server.stop()
    return out


# --- the run ---------------------------------------------------------------------------------------------------------


async def rounds(args: argparse.Namespace, servers: dict[str, Server], phases: set[str]) -> dict[str, Any]:
    raw: dict[str, dict[str, list[float]]] = {"latency_s": {}, "pair_ratio": {}, "seq_cpu_s_per_image": {}}
    raw.update({"images_per_s": {}, "cpu_s_per_image": {}})
    order = list(servers) + ([SYNC_CLIENTS] if args.attribution else [])
    for r in range(args.rounds):
        if "latency" in phases:
            await latency_round(args, servers["plain"], servers["darkroom_1w"], raw, r)
        for name in order if r % 2 == 0 else order[::-1]:
            if "throughput" in phases:
                server = servers.get(name) or servers["darkroom_1w"]
                tput = {"plain": tput_plain, SYNC_CLIENTS: tput_darkroom_sync}.get(name, tput_darkroom)
                job = _wrap(tput(server, args.clients, args.jobs, args.tput_steps))
                res, wall, cpu = await measured(server, bounded(job, args.phase_timeout))
                rate = f"{args.jobs / wall:.2f} images/s, {cpu / args.jobs:.3f} CPU s/image"
                log(f"round {r + 1} throughput {name}: {rate}")
                if "values" in res:
                    raw["images_per_s"].setdefault(name, []).append(args.jobs / wall)
                    raw["cpu_s_per_image"].setdefault(name, []).append(cpu / args.jobs)
    return raw


async def latency_round(
    args: argparse.Namespace, plain: Server, darkroom: Server, raw: dict[str, dict[str, list[float]]], r: int
) -> None:
    """One round of paired sequential requests; each server's CPU over the round (its idle time between its own
    requests included: an idle service that spends CPU spends it on every request)."""
    n = args.seq_requests
    cpu0 = {s.name: s.cpu() for s in (plain, darkroom)}
    res = await bounded(pairs(plain, darkroom, n, args.steps), args.phase_timeout)
    if res.get("timed_out"):
        log(f"round {r + 1} latency: timed out")
        return
    for name, server, key in (("plain", plain, "plain"), ("darkroom_1w", darkroom, "darkroom")):
        raw["latency_s"].setdefault(name, []).append(median(res[key]))
        raw["seq_cpu_s_per_image"].setdefault(name, []).append((server.cpu() - cpu0[server.name]) / n)
    raw["pair_ratio"].setdefault("darkroom_1w", []).append(median(res["pair_ratio"]))
    log(f"round {r + 1} latency: plain {median(res['plain']):.3f} s, darkroom {median(res['darkroom']):.3f} s")


async def _wrap(coro: Awaitable[Any]) -> dict[str, Any]:
    return {"values": await coro}


async def warm_up(servers: dict[str, Server]) -> dict[str, float]:
    """Load the model in every server (darkroom loads it on the first job) before anything is timed; all at once,
    since nothing is measured yet."""

    async def first(name: str, server: Server) -> float:
        started = time.perf_counter()
        await sequential(server, 2, 2)
        return round(time.perf_counter() - started, 2)

    times = await asyncio.gather(*(first(name, server) for name, server in servers.items()))
    return dict(zip(servers, times, strict=True))


def summarize(raw: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    med = {key: {name: median(vs) for name, vs in by.items()} for key, by in raw.items()}
    lat, ips, cpu, seq_cpu = med["latency_s"], med["images_per_s"], med["cpu_s_per_image"], med["seq_cpu_s_per_image"]
    out: dict[str, Any] = {
        "latency": {
            "plain_median_ms": ms(lat.get("plain")),
            "darkroom_median_ms": ms(lat.get("darkroom_1w")),
            "ratio_darkroom_vs_plain": ratio(lat.get("darkroom_1w"), lat.get("plain")),
            "median_pair_ratio": ratio(med["pair_ratio"].get("darkroom_1w"), 1.0),
            "cpu_ms_per_image": {k: ms(v) for k, v in seq_cpu.items()},
        },
        "throughput": {
            "images_per_s": {k: round(v, 3) for k, v in ips.items()},
            "ratio_1_worker_vs_plain": ratio(ips.get("darkroom_1w"), ips.get("plain")),
            "ratio_2_workers_vs_plain": ratio(ips.get("darkroom_2w"), ips.get("plain")),
            "ratio_vs_plain": {k: ratio(v, ips.get("plain")) for k, v in ips.items() if k != "plain"},
            "cpu_ms_per_image": {k: ms(v) for k, v in cpu.items()},
        },
    }
    for section, table in (("latency", seq_cpu), ("throughput", cpu)):
        plain = table.get("plain")
        beyond = {k: ms(v - plain) for k, v in table.items() if k != "plain" and plain is not None}
        out[section]["darkroom_cpu_beyond_engine_ms_per_image"] = beyond
    out["raw"] = {key: {n: [round(v, 4) for v in vs] for n, vs in by.items()} for key, by in raw.items()}
    return out


async def run(args: argparse.Namespace, models_dir: Path, work: Path) -> dict[str, Any]:
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if unknown := phases - set(PHASES):
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    model = ensure_model(models_dir)
    (work / "logs").mkdir()
    result: dict[str, Any] = {
        "benchmark": "service_overhead",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "omp_threads": args.omp_threads,
        "model": "darkroom-smoke-test (random weights, tiny SD-1 shapes)",
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if phases & {"latency", "throughput"}:
        await guarded(result, "servers", server_phases(args, phases, model, models_dir, work, result))
    if "sql" in phases:
        await guarded(result, "sql_per_request", asyncio.to_thread(sql_phase, models_dir, args.sql_requests))
    if "submit" in phases:
        await guarded(result, "submit_api_only", submit_phase(args, models_dir, work / "logs"))
    return result


async def guarded(result: dict[str, Any], key: str, work: Awaitable[Any]) -> None:
    """A phase that fails is reported as such (with the server logs' tail) and the others still run."""
    try:
        value = await work
    except Exception as exc:  # noqa: BLE001 - a benchmark reports what broke rather than dying on it
        result.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"[-3000:]
        return
    if value is not None:
        result[key] = value


async def server_phases(
    args: argparse.Namespace, phases: set[str], model: Path, models_dir: Path, work: Path, result: dict[str, Any]
) -> None:
    logs, env = work / "logs", bench_env(args.omp_threads)
    servers = {
        "plain": plain_server("plain", model, logs, env),
        "darkroom_1w": darkroom_server("darkroom_1w", work / "data1", models_dir, 1, logs, env),
        "darkroom_2w": darkroom_server("darkroom_2w", work / "data2", models_dir, 2, logs, env),
    }
    if args.attribution:
        bare = bench_env(
            args.omp_threads, {"DARKROOM_SECURITY__WATERMARK": "false", "DARKROOM_SECURITY__C2PA": "false"}
        )
        servers["darkroom_1w_no_provenance"] = darkroom_server(
            "darkroom_1w_no_provenance", work / "data3", models_dir, 1, logs, bare
        )
    try:
        result["ready_s"] = {name: round(s.wait_ready(), 2) for name, s in servers.items()}
        log(f"servers ready: {result['ready_s']}")
        result["first_requests_s"] = await warm_up(servers)
        log(f"warmed up: {result['first_requests_s']}")
        result.update(summarize(await rounds(args, servers, phases)))
        result["rss_mb"] = {name: round(s.rss() / 2**20, 1) for name, s in servers.items()}
    except Exception:
        result["server_log_tails"] = {name: s.tail(1500) for name, s in servers.items()}
        raise
    finally:
        for server in servers.values():
            server.stop()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--load-client"]:  # one load process of the submit phase (`_spread_load`)
        url, seconds, clients, rate = argv[1], float(argv[2]), int(argv[3]), float(argv[4])
        json.dump(asyncio.run(submit_load(url, clients, seconds, rate=rate)), sys.stdout)
        return
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp:
        work = Path(tmp)
        models_dir = args.models_dir or work / "models"
        result = asyncio.run(run(args, models_dir, work))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
