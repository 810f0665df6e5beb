"""Secure by default, with the real `darkroom serve` process: without API keys it will not open itself to the
network, `--insecure` overrides that loudly, and once a key exists every request needs one."""

from __future__ import annotations

import json
import subprocess

import httpx

from tests.integration.harness import DARKROOM, Proc, free_port, wait_until

BASE = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


def serve(tmp_path, models_dir, *extra: str, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """`darkroom serve` on every address (0.0.0.0), as a container would run it."""
    port = free_port()
    args = [DARKROOM, "serve", "--host", "0.0.0.0", "--port", str(port), "--workers", "0", *extra]
    full = {"DARKROOM_DATA_DIR": str(tmp_path / "data"), "DARKROOM_MODELS_DIR": str(models_dir), **(env or {})}
    return Proc(args, tmp_path / f"serve-{port}.log", full), f"http://127.0.0.1:{port}"


def healthy(proc: Proc, url: str) -> bool:
    if not proc.alive():
        raise AssertionError(f"server exited:\n{proc.output()}")
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_non_loopback_bind_without_keys_refuses_to_start(tmp_path, models_dir):
    proc, url = serve(tmp_path, models_dir)
    assert proc.popen.wait(120) == 2
    output = proc.output()
    assert "refusing to start" in output and "--insecure" in output
    proc.stop()


def test_insecure_opens_it_and_says_so(tmp_path, models_dir):
    proc, url = serve(tmp_path, models_dir, "--insecure")
    try:
        wait_until(lambda: healthy(proc, url), timeout=120, what="server")
        assert "ANYONE" in proc.output()
        assert httpx.get(f"{url}/v1/jobs", timeout=10).status_code == 200
    finally:
        proc.stop()


def test_with_a_key_it_starts_on_any_address_and_requires_the_key(tmp_path, models_dir):
    made = subprocess.run(
        [DARKROOM, "keys", "create", "--role", "admin", "--json", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        check=True,
    )
    token = json.loads(made.stdout)["token"]
    proc, url = serve(tmp_path, models_dir)
    try:
        wait_until(lambda: healthy(proc, url), timeout=120, what="server")
        assert "API keys required" in proc.output()
        assert httpx.post(f"{url}/v1/jobs", json=BASE, timeout=10).status_code == 401
        response = httpx.post(f"{url}/v1/jobs", json=BASE, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code == 202, response.text
    finally:
        proc.stop()


def test_a_bootstrap_admin_key_from_the_environment_opens_it_once(tmp_path, models_dir):
    token = subprocess.run([DARKROOM, "keys", "token"], capture_output=True, text=True, check=True).stdout.strip()
    assert token.startswith("dk_")
    env_proc, url = serve(tmp_path, models_dir, env={"DARKROOM_SECURITY__BOOTSTRAP_ADMIN_KEY": token})
    try:
        wait_until(lambda: healthy(env_proc, url), timeout=120, what="server")
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{url}/v1/keys", headers=headers, timeout=10).status_code == 200
        audit = httpx.get(f"{url}/v1/audit", headers=headers, params={"action": "key.create"}, timeout=10).json()
        assert [(r["actor"], r["details"].get("bootstrap")) for r in audit] == [("system:bootstrap", True)]
    finally:
        env_proc.stop()
    again, url = serve(tmp_path, models_dir, env={"DARKROOM_SECURITY__BOOTSTRAP_ADMIN_KEY": token})
    try:
        wait_until(lambda: healthy(again, url), timeout=120, what="server")
        assert len(httpx.get(f"{url}/v1/keys", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()) == 1
    finally:
        again.stop()
    forged, _ = serve(tmp_path, models_dir, env={"DARKROOM_SECURITY__BOOTSTRAP_ADMIN_KEY": token[:-4] + "AAAA"})
    assert forged.popen.wait(120) == 2 and "another secret" in forged.output()
    forged.stop()
