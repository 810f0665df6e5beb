"""What `darkroom serve` prints at start, as an operator reads it: the data dir, one line per model, the address, and
no library chatter (Alembic steps, per-file hashing, third-party warnings)."""

from __future__ import annotations

import re

import httpx
import pytest

from .harness import DARKROOM, FAST_LEASES, Proc, free_port, wait_until

pytestmark = pytest.mark.integration


def serve(tmp_path, models_dir, name: str, workers: int) -> tuple[Proc, str]:
    port = free_port()
    env = {"DARKROOM_DATA_DIR": str(tmp_path / "data"), "DARKROOM_MODELS_DIR": str(models_dir), **FAST_LEASES}
    args = [DARKROOM, "serve", "--port", str(port), "--workers", str(workers), "--log-level", "info"]
    return Proc(args, tmp_path / f"{name}.log", env), f"http://127.0.0.1:{port}"


def healthy(proc: Proc, url: str) -> bool:
    assert proc.alive(), proc.output()
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_start_up_says_what_matters_and_nothing_else(tmp_path, models_dir):
    first, url = serve(tmp_path, models_dir, "first", workers=1)
    try:  # a worker that has loaded its model has imported torch, diffusers and transformers: their chatter is in
        wait_until(lambda: healthy(first, url) and "preloaded" in first.output(), timeout=120, what="a worker")
    finally:
        first.stop()
    out = first.log.read_text()
    lines = out.splitlines()
    assert f"data dir {tmp_path / 'data'} (from DARKROOM_DATA_DIR)" in out
    assert not [line for line in lines if "alembic" in line.lower()], out
    assert len([line for line in lines if "schema migrated from empty to" in line]) == 1, out
    assert "hashing" not in out
    assert sorted(re.findall(r"registry: model (\S+):", out)) == ["tiny-diffusers", "tiny-single"], out
    assert not [line for line in lines if "Warning" in line or "warn(" in line], out
    assert "it/s" not in out and "GET /healthz" not in out, out  # no progress bars, no line per request

    again, url = serve(tmp_path, models_dir, "again", workers=0)  # same data dir: nothing to migrate
    try:
        wait_until(lambda: healthy(again, url), timeout=60, what="the second start")
    finally:
        again.stop()
    out = again.log.read_text()
    assert "migrated" not in out and "alembic" not in out.lower()
    assert sorted(re.findall(r"registry: model (\S+):", out)) == ["tiny-diffusers", "tiny-single"], out
