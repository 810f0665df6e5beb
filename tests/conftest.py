"""Shared fixtures. Tiny real diffusers models are built once per session by tests/support (no downloads)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's models are its own, copied into fresh folders by the tests: approved on first sight, as in a deployment
# that turns `security.approve_first_seen_models` on. The default (a new file waits for an operator) is covered by
# tests/unit/test_model_versions.py, which turns it off.
os.environ.setdefault("DARKROOM_SECURITY__APPROVE_FIRST_SEEN_MODELS", "true")
# The admission limit follows latency down to 4 requests at once (`server.admission_floor`). Two xdist workers on two
# busy cores make any request slow now and then, and a test that sends a handful of requests at once would meet a
# 429 `overloaded` it is not about. The suite's servers keep 16; admission itself is tested with its own settings
# (tests/unit/test_admission.py, test_api_edge.py, tests/integration/test_api_load.py).
os.environ.setdefault("DARKROOM_SERVER__ADMISSION_FLOOR", "16")
# A worker process on the CPU runs 10 nicer than the API by default (`cpu_worker_nice`); in the suite it would wait
# behind the xdist workers' own CPU work, which no deployment has. tests/integration/test_api_processes.py sets it.
os.environ.setdefault("DARKROOM_CPU_WORKER_NICE", "0")

# The suite never reads or writes the developer's own darkroom files: `darkroom serve` records its data dir under
# $XDG_STATE_HOME, and the user's darkroom.toml lives under $XDG_CONFIG_HOME. Each test process (one per xdist
# worker) gets folders of its own, so parallel workers' servers never overwrite each other's record either. Tests
# that exercise those files set their own paths with monkeypatch.
_HOME = Path(tempfile.mkdtemp(prefix="darkroom-test-home-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["XDG_STATE_HOME"] = str(_HOME / "state")
os.environ["XDG_CONFIG_HOME"] = str(_HOME / "config")
os.environ.pop("DARKROOM_CONFIG", None)

pytest_plugins = ["tests.support.fixtures"]

# Fixtures that start an external service (a PostgreSQL cluster, the S3 server process). A test that uses one, directly
# or through a backend fixture parametrized "postgresql", is an integration test whatever folder it lives in, so
# `-m "not integration"` stays hermetic without every module having to remember to say so.
SERVICE_FIXTURES = frozenset({"pg_cluster", "pg_server", "pg_url", "s3_server", "s3_bucket"})
SERVICE_PARAMS = frozenset({"postgresql"})


def _uses_a_service(item: pytest.Item) -> bool:
    if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(
        isinstance(value, str) and value in SERVICE_PARAMS for value in callspec.params.values()
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not item.get_closest_marker("integration") and _uses_a_service(item):
            item.add_marker(pytest.mark.integration)


def _copy_model(src: Path, dest_dir: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest_dir / src.name)
        return
    shutil.copy2(src, dest_dir / src.name)
    for sidecar in (src.with_suffix(".config"), src.with_suffix(".json")):
        if sidecar.is_dir():
            shutil.copytree(sidecar, dest_dir / sidecar.name)
        elif sidecar.is_file():
            shutil.copy2(sidecar, dest_dir / sidecar.name)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_diffusers_model, tiny_single_file_model) -> Path:
    """A models folder holding the tiny model in both on-disk formats users bring."""
    root = tmp_path_factory.mktemp("models")
    _copy_model(tiny_diffusers_model, root)
    _copy_model(tiny_single_file_model, root)
    return root


def require_service(message: str) -> None:
    """In CI a missing service is a failure, never a skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_cluster():
    from tests.infra.postgres import PgCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        require_service("PostgreSQL binaries not found (`make test` installs them with scripts/test-services.sh)")
    cluster = PgCluster(bindir).init()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def pg_server(request) -> str:
    return os.environ.get("DARKROOM_TEST_PG_URL") or request.getfixturevalue("pg_cluster").url


@pytest.fixture
def pg_url(pg_server) -> str:
    from tests.infra.postgres import fresh_database

    return fresh_database(pg_server)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server process (moto's standalone server) for the whole session."""
    from tests.infra.s3 import S3Server, moto_available

    if not moto_available():
        require_service("moto[server] is not installed (`make test` installs the test extra)")
    server = S3Server()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3_server.new_bucket()
