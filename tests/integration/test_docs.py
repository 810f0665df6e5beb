"""The docs run: every code block marked `run` in README.md and docs/*.md is executed against one live server, and
every relative link in them points at a file that exists.

The server is what a user has after `make run`, plus an admin key: a real `darkroom serve` process with one
in-process worker and the tiny models (tests/support/tiny_models.py), SQLite and a local blob folder, no webhook
secret. Each block runs on its own (`bash -eo pipefail` for sh, the venv's python for python) in one shared working
folder, with the environment the docs tell readers to set:

| variable | value |
| --- | --- |
| `DARKROOM_URL` | the live server's base URL (the docs' `http://127.0.0.1:8000`) |
| `DARKROOM_API_KEY` | an admin key of that server |
| `DARKROOM_DATA_DIR` | its data folder, so CLI commands (`darkroom keys create`, …) act on its database |
| `PATH` | the venv's bin first, so `darkroom`, `python` and `pip` are the project's |

The working folder holds `photo.png` (an RGB image) and `mask.png` (RGBA: a transparent square in an opaque frame),
the files the img2img and edit examples upload. A `.curlrc` with `fail-with-body` makes `curl` exit non-zero on an
HTTP error while still printing the body, so an example that answers 422 fails here as it would for a reader who
looked at the output. A failing block fails its test with the block's `file:line`, its code and its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from PIL import Image, ImageDraw

from darkroom.auth.keys import new_token
from darkroom.webhooks.signing import sign
from tests.integration.harness import Cluster
from tests.support.doctest_blocks import PYTHON, Block, broken_links, doc_files, runnable_blocks

BLOCKS = runnable_blocks()
BLOCK_TIMEOUT = 120
# Paths the docs tell a reader to create, so they are absent from a checkout by design.
CREATED_BY_THE_READER = ("deploy/.env",)


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("docs")
    _, admin_key = new_token()
    cluster = Cluster(tmp, models_dir, env={"DARKROOM_SECURITY__BOOTSTRAP_ADMIN_KEY": admin_key})
    try:
        cluster.start_server(workers=1)
        yield cluster, admin_key
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs-work")
    Image.new("RGB", (64, 64), (90, 120, 200)).save(folder / "photo.png")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=(255, 255, 255, 0))
    mask.save(folder / "mask.png")
    (folder / ".curlrc").write_text("fail-with-body\nshow-error\n")
    return folder


def block_env(cluster: Cluster, key: str, workdir: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **cluster.env,
        "DARKROOM_URL": cluster.url,
        "DARKROOM_API_KEY": key,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "CURL_HOME": str(workdir),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def run_block(block: Block, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    interpreter = [sys.executable] if block.lang in PYTHON else ["bash", "-eo", "pipefail"]
    args = [*interpreter, "-c", block.code]
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL
    )


@pytest.mark.integration
@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_doc_block_runs(block: Block, docs_server, workdir: Path) -> None:
    cluster, key = docs_server
    try:
        result = run_block(block, block_env(cluster, key, workdir), workdir)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.where}: still running after {BLOCK_TIMEOUT}s\n{block.code}\n--- output\n{exc.output}")
    if result.returncode != 0:
        pytest.fail(
            f"{block.where}: exit {result.returncode}\n{block.code}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-4000:]}\n--- server\n{cluster.logs()[-3000:]}",
            pytrace=False,
        )


def test_the_docs_have_runnable_examples() -> None:
    """A marker typo would silently turn the doc test off: the pages with API examples must keep theirs."""
    pages = {b.path.name for b in BLOCKS}
    assert {"README.md", "api.md"} <= pages, pages


def test_every_relative_link_and_path_in_the_docs_exists() -> None:
    broken = [b for b in broken_links() if not b.endswith(tuple(f"`{p}`" for p in CREATED_BY_THE_READER))]
    assert not broken, "\n".join(broken)


def test_the_link_checker_sees_every_doc_page() -> None:
    names = {p.name for p in doc_files()}
    assert {"README.md", "api.md", "architecture.md", "security.md"} <= names


def test_the_documented_webhook_check_agrees_with_the_server_signing() -> None:
    """api.md's few lines for receivers without the SDK accept what darkroom signs and refuse the rest."""
    block = next(b for b in BLOCKS if "def verify(" in b.code)
    namespace: dict[str, object] = {}
    exec(compile(block.code, block.where, "exec"), namespace)
    verify = cast(Callable[[bytes, str, str], bool], namespace["verify"])
    body = b'{"id": "whd_1", "type": "job.succeeded"}'
    assert verify(body, sign("s3cret", body), "s3cret")
    assert not verify(body + b" ", sign("s3cret", body), "s3cret")
    assert not verify(body, sign("other", body), "s3cret")
    assert not verify(body, sign("s3cret", body, timestamp=time.time() - 301), "s3cret")
