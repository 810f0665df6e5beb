"""Input hardening, end to end: no path traversal through any id or name, and oversized, bomb or disallowed images
are a 4xx naming the field, on all three APIs. Traversal URLs go over real loopback HTTP (http.client sends the path
byte for byte; an HTTP client library would collapse the `..` segments before they reach the server)."""

from __future__ import annotations

import base64
import http.client
import io
import resource
import struct
import time
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from darkroom.api.app import create_app
from darkroom.cli import app as cli_app
from darkroom.config import Limits, Settings
from darkroom.errors import InvalidRequest, NotFound
from darkroom.models.registry import ModelRegistry
from darkroom.service import Services
from darkroom.storage import LocalBlobStore
from tests.support.live import LiveServer

MAX_UPLOAD = 200_000
BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
TRAVERSALS = ["../../etc/passwd", "/etc/passwd", "tiny-single/../../../../etc/passwd", "..", "..\\..\\windows"]
SECRET = "root:"  # what /etc/passwd starts with; must never appear in a response


@pytest.fixture
def services(tmp_path: Path, models_dir: Path):  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        sync_timeout_seconds=0.5,
        limits=Limits(max_upload_bytes=MAX_UPLOAD),
    )
    svc = Services.open(settings)
    yield svc
    svc.close()


@pytest.fixture
def api(services: Services):  # type: ignore[no-untyped-def]
    with TestClient(create_app(services, workers=0)) as client:
        yield client


# --- images to send --------------------------------------------------------------------------------------------------


def encoded(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", size, (120, 30, 30))
    extra = {"save_all": True, "append_images": [image.copy()]} if fmt == "MPO" else {}  # one frame reads as JPEG
    image.save(out, format=fmt, **extra)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels (30000² would be 2.7 GB decoded) in a few KB: the IDAT is
    a deflate stream of zeros, the most compressible thing there is. Made by hand: Pillow would try to allocate it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4_000_000, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_IMAGES = {
    "oversized": (b"\x89PNG" + b"\0" * (MAX_UPLOAD + 1000), 413),
    "bomb": (bomb_png(30000, 30000), 422),
    "too_many_pixels": (bomb_png(5000, 5000), 422),  # under Pillow's own bomb limit, over darkroom's
    "gif": (encoded("GIF"), 422),
    "bmp": (encoded("BMP"), 422),
    "tiff": (encoded("TIFF"), 422),
}


def send_v1(api: TestClient, data: bytes):  # type: ignore[no-untyped-def]
    response = api.post("/v1/jobs", json={**BASE, "init_image": b64(data)})
    return response, response.json()["error"]["field"]


def send_a1111(api: TestClient, data: bytes):  # type: ignore[no-untyped-def]
    response = api.post("/sdapi/v1/img2img", json={**BASE, "init_images": [b64(data)], "denoising_strength": 0.5})
    return response, response.json()["error"]["field"]


def send_openai(api: TestClient, data: bytes):  # type: ignore[no-untyped-def]
    files = {"image": ("source.png", data, "image/png")}
    response = api.post("/v1/images/edits", data={"prompt": "a lighthouse", "size": "64x64"}, files=files)
    return response, response.json()["error"]["param"]


ENDPOINTS = {"v1": (send_v1, "init_image"), "a1111": (send_a1111, "init_images"), "openai": (send_openai, "image")}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_refused_naming_the_field(api: TestClient, endpoint: str, case: str) -> None:
    send, field = ENDPOINTS[endpoint]
    data, status = BAD_IMAGES[case]
    if endpoint == "openai" and status == 422:
        status = 400  # OpenAI's status for invalid input
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    response, named = send(api, data)
    elapsed = time.monotonic() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert response.status_code == status, response.text
    assert named == field
    if case in ("bomb", "too_many_pixels"):
        assert "pixels" in response.text
    assert elapsed < 2.0 and grown_mb < 200, f"{case}: {elapsed:.2f} s, +{grown_mb:.0f} MB peak: it was decoded"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "MPO"])
def test_allowed_formats_still_pass(api: TestClient, fmt: str) -> None:
    """MPO is the JPEG variant many cameras and phones write: refusing it would refuse their photos."""
    response = api.post("/v1/jobs", json={**BASE, "init_image": b64(encoded(fmt))})
    assert response.status_code == 202, response.text


# --- traversal: ids and names in requests -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAVERSALS)
def test_model_names_are_looked_up_never_joined_into_a_path(api: TestClient, name: str) -> None:
    attempts = [
        (api.post("/v1/jobs", json={**BASE, "model": name}), "model"),
        (
            api.post("/sdapi/v1/txt2img", json={**BASE, "override_settings": {"sd_model_checkpoint": name}}),
            "override_settings.sd_model_checkpoint",
        ),
        (api.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}), "sd_model_checkpoint"),
        (api.post("/v1/images/generations", json={"prompt": "x", "model": name, "size": "64x64"}), "model"),
    ]
    for response, field in attempts:
        assert response.status_code in (400, 404, 422), response.text
        error = response.json()["error"]
        assert error.get("field", error.get("param")) == field
        assert SECRET not in response.text


RAW_PATHS = [
    ("GET", "/v1/images/..%2F..%2F..%2Fetc%2Fpasswd"),
    ("GET", "/v1/images/../../../etc/passwd"),
    ("GET", "/v1/images/%2Fetc%2Fpasswd"),
    ("GET", "/v1/jobs/../../x"),
    ("GET", "/v1/jobs/..%2F..%2Fx"),
    ("DELETE", "/v1/jobs/..%2F..%2Fdata%2Fdarkroom.db"),
    ("GET", "/v1/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd/events"),
    ("GET", "/v1/images/..%5c..%5cetc%5cpasswd"),
    ("GET", "/sdapi/v1/../../../etc/passwd"),
    ("GET", "/../../../../etc/passwd"),
]


def test_traversal_in_urls_is_404_over_real_http(services: Services) -> None:
    with LiveServer(create_app(services, workers=0)) as server:
        for method, path in RAW_PATHS:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            try:
                conn.request(method, path)
                response = conn.getresponse()
                body = response.read().decode(errors="replace")
            finally:
                conn.close()
            assert response.status in (400, 404, 405), f"{method} {path}: {response.status} {body[:200]}"
            assert SECRET not in body


# --- traversal: blob keys and model names on disk ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["../victim", "/etc/passwd", "aa/bb/../../../victim", "..", "", "aa/bb/" + "0" * 63 + "/", "AA/BB/x"]
)
def test_local_blob_store_refuses_keys_it_did_not_make(tmp_path: Path, key: str) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    for call in (store.get, store.exists, store.delete):
        with pytest.raises(NotFound):
            call(key)
    assert victim.read_text() == "keep me"
    digest, made = store.put(b"bytes", "application/octet-stream")
    assert made == f"{digest[:2]}/{digest[2:4]}/{digest}"
    assert (tmp_path / "blobs" / made).resolve().is_relative_to((tmp_path / "blobs").resolve())


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/../../evil", "..", "..\\evil"])
def test_models_add_refuses_a_name_that_is_a_path(tmp_path: Path, tiny_single_file_model: Path, name: str) -> None:
    models = tmp_path / "models"
    with pytest.raises(InvalidRequest, match="plain name") as info:
        ModelRegistry(models, tmp_path / "hashes.json").add(tiny_single_file_model, name=name)
    assert info.value.field == "name"
    result = CliRunner().invoke(
        cli_app,
        ["models", "add", str(tiny_single_file_model), "--name", name, "--models-dir", str(models)],
        env={"DARKROOM_DATA_DIR": str(tmp_path / "data")},
    )
    assert result.exit_code == 1 and "plain name" in result.output
    assert not list(tmp_path.glob("evil*")) and not list(tmp_path.parent.glob("evil*"))
    assert not models.exists() or not any(models.iterdir())
