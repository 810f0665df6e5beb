"""Packaging by role: the base install (API + job store + SDK + CLI) carries no ML stack, and every import is declared.

Two layers. The quick checks read pyproject.toml and src/, and run the API, the CLI and the SDK in a child of this venv
with the ML stack made unimportable (`sys.modules[name] = None`: `import` fails and `find_spec` reports it absent, as
on an install without it). The integration test does what a user does: `pip install .` into a clean venv (no torch
there), then `darkroom serve --workers 0` takes an authenticated job and `darkroom worker` refuses in one line naming
`darkroom[worker]`. Its venv costs about 20 s with pip's cache warm (PyPI for fastapi and the rest; never torch).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import Proc, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "darkroom"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ML_STACK = ("torch", "diffusers", "transformers", "accelerate", "peft", "scipy", "torchsde", "safetensors", "numpy")
_RUNTIME_EXTRAS = ("worker", "verify", "postgres", "s3", "c2pa", "tracing")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    """Distribution names (PEP 503 normalised), without versions, markers, extras or self-references."""
    names = {normalise(re.match(r"[A-Za-z0-9._-]+", r.strip()).group(0)) for r in requirements}  # type: ignore[union-attr]
    return names - {"darkroom"}


def base_requirements() -> set[str]:
    return requirement_names(PYPROJECT["project"]["dependencies"])


def extra_requirements(*extras: str) -> set[str]:
    optional = PYPROJECT["project"]["optional-dependencies"]
    return set().union(*(requirement_names(optional[e]) for e in extras))


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module → the src files that import it, for every absolute import of a non-stdlib module."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("darkroom", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


# Installed beside the extras rather than by them, each for a stated reason (and by the Makefile and deploy/Dockerfile)
INSTALLED_APART = {
    "spandrel": "pip install --no-deps: it declares torchvision, whose PyPI build breaks diffusers beside CPU torch",
}


def test_every_third_party_import_is_declared():
    declared = base_requirements() | extra_requirements(*_RUNTIME_EXTRAS) | set(INSTALLED_APART)
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "deploy" / "Dockerfile").read_text()
    assert all(f"--no-deps '{name}" in makefile and f"--no-deps '{name}" in dockerfile for name in INSTALLED_APART)
    dists = packages_distributions()
    undeclared = {
        module: sorted(files)
        for module, files in third_party_imports().items()
        if not {normalise(d) for d in dists.get(module, [module])} & declared
    }
    assert undeclared == {}, "imported under src/ but declared in neither dependencies nor a runtime extra"


def test_the_base_install_has_no_ml_stack_and_the_worker_extra_pins_torch():
    assert base_requirements().isdisjoint(ML_STACK)
    assert set(ML_STACK) <= extra_requirements("worker")
    assert "torch==2.13.0" in PYPROJECT["project"]["optional-dependencies"]["worker"]
    test_extra = " ".join(PYPROJECT["project"]["optional-dependencies"]["test"])
    assert all(extra in test_extra for extra in _RUNTIME_EXTRAS if extra != "verify")  # the suite runs every role


def run_without_ml_stack(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`code` in a child of this venv in which the ML stack cannot be imported."""
    prelude = f"import sys\nfor _name in {ML_STACK!r}:\n    sys.modules[_name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


# The only modules that may need the ML stack: the engine and what only it (or the watermark) uses.
WORKER_ONLY = {
    "darkroom.engines.acceleration",
    "darkroom.engines.adapters",
    "darkroom.engines.batch_limits",
    "darkroom.engines.classify",
    "darkroom.engines.diffusers_engine",
    "darkroom.engines.prepare",
    "darkroom.safety.watermark",
}


def test_every_module_but_the_engine_imports_without_the_ml_stack():
    """So no API, store, CLI or SDK path can pull torch in at import time: a new top-level import fails here."""
    code = """
        import importlib, pkgutil
        import darkroom

        failed = {}
        for info in pkgutil.walk_packages(darkroom.__path__, "darkroom."):
            if ".migrations" not in info.name:
                try:
                    importlib.import_module(info.name)
                except ImportError as exc:
                    failed[info.name] = str(exc)
        print(sorted(failed))
    """
    result = run_without_ml_stack(code)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == str(sorted(WORKER_ONLY))


def test_the_sdk_imports_with_httpx_alone():
    """Once httpx is loaded, `darkroom.client` needs no other third-party module."""
    code = """
        import importlib.abc, sys
        import httpx
        allowed = {name.split(".")[0] for name in sys.modules} | set(sys.stdlib_module_names) | {"darkroom"}

        class OnlyHttpx(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] not in allowed:
                    raise ImportError(f"darkroom.client imported {name}")

        sys.meta_path.insert(0, OnlyHttpx())
        import darkroom.client
        print(darkroom.client.Client.__name__)
    """
    result = run_without_ml_stack(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Client"


def test_an_api_only_node_serves_and_queues_without_the_ml_stack(tmp_path, models_dir):
    """The serve path's modules, the app and a queued job, with torch & co. unimportable (the fast stand-in for the
    clean-venv test below)."""
    code = """
        import sys
        from fastapi.testclient import TestClient
        import darkroom.cli
        from darkroom.api.app import create_app
        from darkroom.config import Settings
        from darkroom.service import Services

        services = Services.open(Settings(workers=0))
        services.approve_models()
        with TestClient(create_app(services, workers=0)) as client:
            assert client.get("/healthz").status_code == 200
            job = client.post("/v1/jobs", json={"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64})
            assert job.status_code == 202, job.text
        services.close()
        loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in sys.argv[1:])
        print("loaded:", loaded)
    """
    env = {"DARKROOM_DATA_DIR": str(tmp_path / "data"), "DARKROOM_MODELS_DIR": str(models_dir)}
    result = run_without_ml_stack(code, env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "loaded: []" in result.stdout


def test_a_worker_without_the_worker_extra_says_which_extra_to_install(tmp_path):
    code = """
        sys.argv = ["darkroom", "worker"]
        from darkroom.cli import main
        main()
    """
    result = run_without_ml_stack(code, {"DARKROOM_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 2, result.stderr[-4000:]
    assert "install darkroom[worker] (pip install 'darkroom[worker]')" in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr and "torch" in result.stderr, result.stderr[-4000:]


@pytest.mark.parametrize(
    ("extra", "module", "env"),
    [
        ("postgres", "psycopg", {"DARKROOM_DATABASE_URL": "postgresql+psycopg://darkroom@127.0.0.1:1/darkroom"}),
        ("s3", "boto3", {"DARKROOM_STORAGE__BLOB_BACKEND": "s3", "DARKROOM_STORAGE__S3_BUCKET": "images"}),
    ],
)
def test_a_backend_without_its_extra_says_which_extra_to_install(tmp_path, extra, module, env):
    code = f"""
        sys.modules[{module!r}] = None
        sys.argv = ["darkroom", "serve", "--workers", "0"]
        from darkroom.cli import main
        main()
    """
    result = run_without_ml_stack(code, {"DARKROOM_DATA_DIR": str(tmp_path / "data"), **env})
    assert result.returncode == 2, result.stderr[-4000:]
    assert f"install darkroom[{extra}] (pip install 'darkroom[{extra}]')" in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


# --- the real thing: a clean venv ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """A clean venv holding `pip install .` of this working tree (a copy: the build writes no files here)."""
    root = tmp_path_factory.mktemp("packaging")
    tree = root / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = root / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=120)
    # The test extra brings uv: the same resolution and install as pip's, in seconds rather than a minute (the
    # suite's slowest set-up). Without it, pip.
    uv, python = shutil.which("uv", path=str(Path(sys.executable).parent)), str(venv / "bin" / "python")
    install = subprocess.run(
        [uv, "pip", "install", "-q", "--python", python, str(tree)]
        if uv
        else [python, "-m", "pip", "install", "-q", str(tree)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert install.returncode == 0, f"pip install . failed (it needs PyPI or pip's cache):\n{install.stderr[-4000:]}"
    return venv


def venv_run(venv: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.integration
def test_pip_install_dot_serves_an_api_node_without_torch(base_venv, tmp_path, models_dir):
    missing = venv_run(base_venv, "python", "-c", "import torch")
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    listed = venv_run(base_venv, "python", "-m", "pip", "list", "--format=freeze").stdout
    assert not {normalise(line.split("==")[0]) for line in listed.splitlines()} & set(ML_STACK), listed
    sdk = venv_run(base_venv, "python", "-c", "import darkroom.client as c; print(c.Client.__name__)")
    assert sdk.returncode == 0 and sdk.stdout.strip() == "Client", sdk.stderr

    token = venv_run(base_venv, "darkroom", "keys", "token").stdout.strip()
    port = free_port()
    env = {
        "DARKROOM_DATA_DIR": str(tmp_path / "data"),
        "DARKROOM_MODELS_DIR": str(models_dir),  # the session's tiny models: the API node lists them, reads no weights
        "DARKROOM_SECURITY__BOOTSTRAP_ADMIN_KEY": token,
    }
    server = Proc(
        [str(base_venv / "bin" / "darkroom"), "serve", "--port", str(port), "--workers", "0", "--log-level", "warning"],
        tmp_path / "serve.log",
        env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url, server), timeout=60, what=f"readiness of {url}")
        body = {"prompt": "a lighthouse at dusk", "steps": 2, "width": 64, "height": 64}
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/v1/jobs", json=body).status_code == 401
            auth = {"Authorization": f"Bearer {token}"}
            job = http.post("/v1/jobs", json=body, headers=auth)
            assert job.status_code == 202, job.text
            state = http.get(f"/v1/jobs/{job.json()['id']}", headers=auth).json()
            assert state["state"] == "queued" and state["queue_position"] == 1, state
    finally:
        returncode = server.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -SIGTERM is a clean stop here
    assert returncode in (0, -signal.SIGTERM), server.log.read_text(errors="replace")

    worker = venv_run(base_venv, "darkroom", "worker", env={**os.environ, "DARKROOM_DATA_DIR": str(tmp_path / "data")})
    assert worker.returncode == 2, worker.stderr[-4000:]
    assert "install darkroom[worker]" in worker.stderr and "Traceback" not in worker.stderr, worker.stderr[-4000:]


def _ready(url: str, server: Proc) -> bool:
    if not server.alive():
        raise AssertionError(f"darkroom serve exited:\n{server.output()}")
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
