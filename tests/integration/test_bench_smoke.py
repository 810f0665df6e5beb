"""The service benchmarks run end to end with tiny parameters and print the JSON the docs quote, so they never rot.

Each script runs as users run it (a subprocess on this interpreter), against real servers it starts on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def bench_models(tmp_path_factory) -> Path:
    """One models folder with darkroom's smoke model, shared by the runs (each would otherwise build its own)."""
    sys.path.insert(0, str(BENCH))
    try:
        from _common import ensure_model
    finally:
        sys.path.remove(str(BENCH))
    root = tmp_path_factory.mktemp("bench-models")
    ensure_model(root)
    return root


def run_bench(script: str, *args: str, timeout: float = 540) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-6000:]}"
    return json.loads(done.stdout)


def is_positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def test_percentile_is_nearest_rank() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from _common import percentile
    finally:
        sys.path.remove(str(BENCH))
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


@pytest.mark.timeout(600)  # four servers start on a shared CPU: most of the time is imports and model loads
def test_service_overhead_prints_every_figure(bench_models: Path) -> None:
    out = run_bench(
        "service_overhead.py",
        *("--rounds", "1", "--steps", "2", "--seq-requests", "1", "--clients", "2", "--jobs", "2"),
        *("--tput-steps", "2", "--sql-requests", "1", "--submit-clients", "3", "--submit-seconds", "1"),
        *("--clients-per-process", "2"),  # 3 submitting clients in two load processes (2 + 1), merged
        *("--submit-rates", "20"),  # then the same clients at 20 submits/s offered
        *("--queued", "5", "--phase-timeout", "120", "--models-dir", str(bench_models)),
    )
    assert "errors" not in out, (out.get("errors"), out.get("server_log_tails"))
    assert out["benchmark"] == "service_overhead"
    latency, throughput = out["latency"], out["throughput"]
    assert is_positive(latency["plain_median_ms"]) and is_positive(latency["darkroom_median_ms"])
    assert is_positive(latency["ratio_darkroom_vs_plain"])
    assert set(throughput["images_per_s"]) == {"plain", "darkroom_1w", "darkroom_2w"}
    assert is_positive(throughput["ratio_1_worker_vs_plain"]) and is_positive(throughput["ratio_2_workers_vs_plain"])
    assert set(throughput["cpu_ms_per_image"]) == {"plain", "darkroom_1w", "darkroom_2w"}
    assert set(throughput["darkroom_cpu_beyond_engine_ms_per_image"]) == {"darkroom_1w", "darkroom_2w"}
    for kind in ("submit", "status"):
        assert is_positive(out["sql_per_request"][kind]["statements"])
        assert is_positive(out["sql_per_request"][kind]["transactions"])
    closed, offered = out["submit_api_only"]
    assert closed["queued_before"] == 5 and closed["clients"] == 3 and closed["load_processes"] == 2
    assert closed["statuses"].get("202", 0) > 0 and is_positive(closed["accepted"]["p99_ms"])
    assert closed["offered_per_s"] is None and offered["offered_per_s"] == 20 and offered["load_processes"] == 2
    assert 0 < offered["statuses"].get("202", 0) <= 21 and is_positive(offered["accepted"]["p99_ms"])  # ~20 in 1 s


@pytest.mark.timeout(600)
def test_load_reports_latencies_errors_and_memory(bench_models: Path) -> None:
    out = run_bench(
        "load.py",
        *("--clients", "4", "--seconds", "2", "--workers", "1", "--models-dir", str(bench_models)),
        *("--clients-per-process", "2"),  # two load processes, merged
    )
    assert out["benchmark"] == "load" and out["load_processes"] == 2
    assert is_positive(out["first_image_s"])  # the worker's first image came back before the load began
    assert out["jobs_accepted"] > 0 and is_positive(out["jobs_accepted_per_s"])
    assert is_positive(out["submit_accepted"]["p99_ms"]) and is_positive(out["poll"]["p50_ms"])
    assert out["healthz"]["count"] > 0 and is_positive(out["healthz"]["p99_ms"])
    assert out["count_5xx"] == 0 and out["transport_errors"] == 0
    assert {"count_429", "retry_after_missing", "statuses"} <= set(out)
    samples = out["server"]["samples"]
    assert len(samples) >= 2 and all(s["rss_mb"] > 0 for s in samples)


def test_gpu_throughput_on_the_cpu_reports_every_mode_and_ratio() -> None:
    """The GPU benchmark's CPU smoke run: darkroom's tiny model through the engine and the plain-pipeline baseline
    (the service mode is the full service path the other benchmarks cover; it runs on a GPU machine)."""
    out = run_bench(
        "gpu_throughput.py",
        *("--arch", "tiny", "--size", "64", "--steps", "2", "--batches", "1,2", "--repeat", "1"),
        *("--modes", "engine,baseline", "--gpu", "channels_last=on"),
    )
    assert out["benchmark"] == "gpu_throughput" and out["device"] == "cpu"
    assert out["gpu_settings"]["channels_last"] == "on"  # the `gpu` settings the run used, with the figures
    assert set(out["results"]["engine"]) == {"1", "2"} and set(out["results"]["baseline"]) == {"1"}
    for row in (*out["results"]["engine"].values(), out["results"]["baseline"]["1"]):
        assert is_positive(row["images_per_s"]) and is_positive(row["unet_it_per_s"]) and row["tflops"] >= 0
    assert is_positive(out["unet_gflop_per_image"]) and is_positive(out["baseline_over_engine_batch1"])


def test_raw_load_client_reads_sized_chunked_and_closing_answers() -> None:
    """`bench/rawhttp.py`, the submit phase's client, against a loopback server answering in the three ways it
    must read: a sized body, a chunked one (with a trailer), one that closes the connection after it, and a
    connection the server closed while it was idle."""
    import asyncio

    sys.path.insert(0, str(BENCH))
    try:
        import rawhttp
    finally:
        sys.path.remove(str(BENCH))
    answers = [
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\nRetry-After: 3\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
    ]
    seen: list[bytes] = []
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) if b"ength" in head else 0
            seen.append(head.split(b"\r\n")[0] + b" " + await reader.readexactly(length))
            answer = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            if b"close" in answer:
                break
        writer.close()

    async def main() -> list[rawhttp.Response]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = rawhttp.Connection("127.0.0.1", port, {"Authorization": "Bearer t"})
        try:
            out = [await conn.request("POST", "/v1/jobs", b'{"a":1}') for _ in range(3)]
            answers.append(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            out.append(await conn.request("GET", "/healthz"))  # a new connection: the last one was closed
            # With nothing left to answer the server closes this one while it is idle, without saying so first
            # (a keep-alive timeout): the next request goes out on a new connection rather than failing.
            deadline = time.monotonic() + 10
            while conn._reader is not None and not conn._reader.at_eof() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            answers.append(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            out.append(await conn.request("GET", "/healthz"))
        finally:
            await conn.close()
            server.close()
        return out

    sized, chunked, closing, again, after_idle = asyncio.run(main())
    assert (sized.status, sized.body, sized.headers["retry-after"]) == (202, b"hello", "3")
    assert (chunked.status, chunked.body) == (200, b"abcde")
    assert (closing.status, closing.body) == (429, b"no")
    assert (again.status, again.body) == (200, b"")
    assert after_idle.status == 204
    assert connections == 3
    assert seen[:3] == [b'POST /v1/jobs HTTP/1.1 {"a":1}'] * 3 and seen[3] == b"GET /healthz HTTP/1.1 "


def test_ab_runs_each_side_on_its_own_code_in_alternating_rounds() -> None:
    """`bench/ab.py` against HEAD: the base side imports darkroom from the base commit's worktree, the other from
    this checkout, in every round; the report gives each round's figure, the medians and their ratio."""
    probe = (
        "import json, darkroom; "
        "print(json.dumps({'runs': [{'base': int('darkroom-ab-' in darkroom.__file__)}], 'other': 2}))"
    )
    out = run_bench(
        "ab.py",
        "--base",
        "HEAD",
        "--rounds",
        "3",
        "--metric",
        "runs.0.base",
        "--metric",
        "other",
        "--metric",
        "missing.0",
        "--",
        sys.executable,
        "-c",
        probe,
        timeout=120,
    )
    assert out["benchmark"] == "ab" and out["rounds"] == 3
    side = out["metrics"]["runs.0.base"]
    assert side["base"] == [1.0, 1.0, 1.0] and side["head"] == [0.0, 0.0, 0.0]
    assert out["metrics"]["other"]["ratio_head_vs_base"] == 1.0
    assert out["metrics"]["missing.0"]["base_median"] is None
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "darkroom-ab-" not in worktrees  # removed afterwards
