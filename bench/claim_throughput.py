"""Claim throughput of the job store: how fast workers can take jobs off the queue, on SQLite and PostgreSQL.

Each run fills a fresh database with queued jobs, then 1 or 8 claimers (threads, each with its own `JobStore` and
connection pool; or, with `--mode processes`, separate processes as on real worker nodes) claim until the queue is
empty. Throughput is jobs claimed
per second of wall time; ratios compare each run with the 1-claimer run on the same database in the same invocation,
so the numbers mean something on any machine. A second measurement times one job's whole trip through the queue
(create + claim + complete) with a single client: the overhead the queue adds to every image.

    .venv/bin/python bench/claim_throughput.py                 # SQLite + a throwaway PostgreSQL cluster
    .venv/bin/python bench/claim_throughput.py --jobs 500 --pg-url postgresql+psycopg://…/postgres
    .venv/bin/python bench/claim_throughput.py --depth 1000,100000   # costs at a queue depth, not throughput

`--depth` fills a fresh database with that many queued jobs in bulk (one executemany, spread over 50 tenants, three
priorities and seven batch keys) and prints the median milliseconds of a submit, a claim and a status read there:
with indexes that match the claim order and bounded counts, they should not grow with the depth.

PostgreSQL comes from `--pg-url`, else `DARKROOM_TEST_PG_URL`, else a throwaway cluster (tests/infra/postgres.py,
which runs with fsync off). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from darkroom import clock
from darkroom.jobs.db import migrate, write_tx
from darkroom.jobs.store import JobStore, NewImage
from darkroom.jobs.tables import jobs as jobs_table
from darkroom.jobs.tables import queue_counters
from darkroom.schemas import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent
REQUEST = GenerationRequest(prompt="bench", seed=1, width=64, height=64, steps=2)
IMAGE = NewImage(
    index=0, seed=1, width=64, height=64, sha256="0" * 64, blob_key="k", content_type="image/png", size_bytes=1
)


def fill(url: str, jobs: int) -> None:
    store = JobStore(url, max_queue_depth=10**9)
    try:
        for _ in range(jobs):
            store.create(REQUEST)
    finally:
        store.close()


def claim_rate(url: str, jobs: int, claimers: int, mode: str = "threads") -> dict[str, float]:
    """Wall time for `claimers` threads (or processes) to drain `jobs` queued jobs; checks no job was taken twice."""
    fill(url, jobs)
    seconds, claimed = (_drain_threads if mode == "threads" else _drain_processes)(url, claimers)
    if len(claimed) != jobs or len(set(claimed)) != jobs:
        raise RuntimeError(f"{claimers} claimers made {len(claimed)} claims of {len(set(claimed))} jobs, not {jobs}")
    return {"jobs_per_s": round(jobs / seconds, 1), "seconds": round(seconds, 3)}


def _drain(store: JobStore, name: str) -> list[str]:
    ids = []
    while (job := store.claim(name, 300)) is not None:
        ids.append(job.id)
    return ids


def _drain_threads(url: str, claimers: int) -> tuple[float, list[str]]:
    stores = [JobStore(url) for _ in range(claimers)]
    for store in stores:  # open each pool's first connection outside the timed part
        store.counts()
    claimed: list[list[str]] = [[] for _ in stores]
    start = threading.Barrier(claimers + 1)

    def run(index: int) -> None:
        start.wait()
        claimed[index] = _drain(stores[index], f"bench-{index}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    for store in stores:
        store.close()
    return seconds, [job_id for part in claimed for job_id in part]


def _process_claimer(url: str, index: int, ready, go, results) -> None:  # type: ignore[no-untyped-def]
    store = JobStore(url)
    store.counts()
    ready.put(index)
    go.wait()
    results.put(_drain(store, f"bench-{index}"))
    store.close()


def _drain_processes(url: str, claimers: int) -> tuple[float, list[str]]:
    """Separate processes, as worker processes on several nodes are: no shared GIL."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_process_claimer, args=(url, i, ready, go, results)) for i in range(claimers)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    go.set()
    began = time.perf_counter()
    claimed = [job_id for _ in procs for job_id in results.get(timeout=600)]
    seconds = time.perf_counter() - began
    for proc in procs:
        proc.join()
    return seconds, claimed


def trip_overhead(url: str, jobs: int) -> dict[str, float]:
    """Mean milliseconds per job for each queue operation, one client, one job at a time."""
    store = JobStore(url, max_queue_depth=10**9)
    times: dict[str, list[float]] = {"create": [], "claim": [], "start": [], "complete": []}
    try:
        for _ in range(jobs):
            t0 = time.perf_counter()
            job, _ = store.create(REQUEST)
            t1 = time.perf_counter()
            claimed = store.claim("bench", 300)
            t2 = time.perf_counter()
            assert claimed is not None and claimed.id == job.id
            store.start(job.id, "bench")  # as a worker does right before running it: the attempt counts here
            t3 = time.perf_counter()
            store.complete(job.id, "bench", [IMAGE], {"bench": True})
            t4 = time.perf_counter()
            times["create"].append(t1 - t0)
            times["claim"].append(t2 - t1)
            times["start"].append(t3 - t2)
            times["complete"].append(t4 - t3)
    finally:
        store.close()
    out = {f"{op}_ms": round(statistics.fmean(v) * 1000, 3) for op, v in times.items()}
    out["total_ms"] = round(sum(out.values()), 3)
    return out


def bulk_fill(url: str, depth: int) -> None:
    """`depth` queued jobs in one executemany: seconds, not the minutes that one submit each would take."""
    store = JobStore(url)
    now = clock.utcnow()
    request = REQUEST.model_dump(mode="json")
    rows = [
        {
            "id": f"job_bulk{i:08d}",
            "state": "queued",
            "tenant": f"t{i % 50}",
            "priority": (0, 1, 1, 1, 2)[i % 5],
            "model": REQUEST.model,
            "request": request,
            "request_hash": "0" * 64,
            "attempts": 0,
            "max_attempts": 3,
            "cancel_requested": False,
            "progress_step": 0,
            "progress_total": REQUEST.steps,
            "created_at": now - dt.timedelta(seconds=depth - i),
            "updated_at": now,
            "available_at": now - dt.timedelta(seconds=depth - i),
            "fair_tag": float(i // 50),
            "batch_key": f"b{i % 7}",
            "images_requested": 1,
        }
        for i in range(depth)
    ]
    try:
        with write_tx(store.engine) as conn:
            for start in range(0, depth, 10_000):
                conn.execute(jobs_table.insert(), rows[start : start + 10_000])
            shard = queue_counters.c.shard == 0  # what the store's own moves would have counted
            conn.execute(queue_counters.update().where(shard).values(queued=queue_counters.c.queued + depth))
        with store.engine.connect() as conn:
            conn.execute(sa.text("ANALYZE"))
            conn.commit()
    finally:
        store.close()


def depth_costs(url: str, depth: int, samples: int) -> dict[str, float]:
    """Median ms of one submit, one claim and one status read (position + ETA) with `depth` jobs queued."""
    bulk_fill(url, depth)
    store = JobStore(url, max_queue_depth=2 * depth + 10 * samples)
    times: dict[str, list[float]] = {"submit": [], "claim": [], "status": []}
    try:
        store.counts()  # open the pool's first connection outside the timed part
        for i in range(samples):
            t0 = time.perf_counter()
            job, _ = store.create(REQUEST, tenant=f"t{i % 50}")
            t1 = time.perf_counter()
            store.status(job.id)
            t2 = time.perf_counter()
            claimed = store.claim("bench", 300)
            t3 = time.perf_counter()
            assert claimed is not None
            times["submit"].append(t1 - t0)
            times["status"].append(t2 - t1)
            times["claim"].append(t3 - t2)
    finally:
        store.close()
    return {f"{op}_ms_p50": round(statistics.median(v) * 1000, 3) for op, v in times.items()}


def bench_depths(new_url, depths: list[int], samples: int) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    out = {}
    for depth in depths:
        url = new_url()
        migrate(url)
        out[str(depth)] = depth_costs(url, depth, samples)
    return out


def bench_backend(new_url, jobs: int, claimer_counts: list[int], mode: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    runs: dict[str, dict[str, float]] = {}
    for claimers in claimer_counts:
        url = new_url()
        migrate(url)
        runs[str(claimers)] = claim_rate(url, jobs, claimers, mode)
    base = runs[str(claimer_counts[0])]["jobs_per_s"]
    for run in runs.values():
        run["ratio_vs_1"] = round(run["jobs_per_s"] / base, 2)
    url = new_url()
    migrate(url)
    return {"claimers": runs, "per_job": trip_overhead(url, max(100, jobs // 4))}


def _infra():  # type: ignore[no-untyped-def]
    """tests/infra/postgres.py: the project's own throwaway-cluster and fresh-database helpers."""
    sys.path.insert(0, str(ROOT))
    from tests.infra import postgres as infra

    return infra


@contextlib.contextmanager
def postgres(pg_url: str | None) -> Iterator[tuple[str, str]]:
    """(server URL, where it came from)."""
    if pg_url:
        yield pg_url, "given"
        return
    infra = _infra()
    bindir = infra.find_bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL binaries: run scripts/test-services.sh or pass --pg-url")
    cluster = infra.PgCluster(bindir).init()
    try:
        yield cluster.url, "throwaway cluster (fsync off)"
    finally:
        cluster.destroy()


def server_version(url: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SHOW server_version")).scalar_one())
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="queued jobs per claim run")
    parser.add_argument("--claimers", default="1,8", help="comma-separated claimer counts; the first is the baseline")
    parser.add_argument("--pg-url", default=os.environ.get("DARKROOM_TEST_PG_URL"))
    parser.add_argument("--mode", choices=["threads", "processes"], default="threads", help="what a claimer is")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--depth", help="comma-separated queue depths: print submit/claim/status ms at each instead")
    parser.add_argument("--samples", type=int, default=200, help="operations timed at each depth")
    args = parser.parse_args()
    if args.depth:
        main_depth(args, [int(d) for d in args.depth.split(",")])
        return
    counts = [int(c) for c in args.claimers.split(",")]
    report: dict[str, object] = {
        "benchmark": "claim_throughput",
        "jobs": args.jobs,
        "claimers_are": args.mode,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "sqlalchemy": sa.__version__},
    }
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp:
        names = iter(range(1000))
        sqlite_url = lambda: f"sqlite:///{tmp}/bench-{next(names)}.db"  # noqa: E731
        report["sqlite"] = bench_backend(sqlite_url, args.jobs, counts, args.mode)
    if not args.skip_postgres:
        with postgres(args.pg_url) as (server, source):
            fresh = _infra().fresh_database
            report["postgresql"] = bench_backend(lambda: fresh(server), args.jobs, counts, args.mode)
            report["postgresql"]["server"] = {"version": server_version(server), "source": source}
    print(json.dumps(report, indent=2))


def main_depth(args: argparse.Namespace, depths: list[int]) -> None:
    report: dict[str, object] = {
        "benchmark": "claim_throughput --depth",
        "samples": args.samples,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "sqlalchemy": sa.__version__},
    }
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp:
        names = iter(range(1000))
        report["sqlite"] = bench_depths(lambda: f"sqlite:///{tmp}/depth-{next(names)}.db", depths, args.samples)
    if not args.skip_postgres:
        with postgres(args.pg_url) as (server, source):
            fresh = _infra().fresh_database
            report["postgresql"] = bench_depths(lambda: fresh(server), depths, args.samples)
            report["postgresql"]["server"] = {"version": server_version(server), "source": source}  # type: ignore[index]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
