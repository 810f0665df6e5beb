"""A hostile-input corpus against every route that takes a URL or an upload (native, A1111, OpenAI), on SQLite and
PostgreSQL: each bad value is a 4xx that names the field, never a 5xx, and nothing is queued or stored.

The values are what an attacker or a broken client sends: NUL and control characters (PostgreSQL stores no NUL in
text), huge numbers, zero and negative sizes, giant strings, wrong JSON types, invalid base64, decompression bombs,
bytes that are no image, formats outside the allow-list, truncated files, and images far past the pixel limit.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.config import Limits, Settings, WebhookSettings
from darkroom.service import Services

MAX_UPLOAD_BYTES = 200_000
MAX_UPLOAD_PIXELS = 64 * 1024  # a 1x100000 image is over it
SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


# --- images to send ---------------------------------------------------------------------------------------------------


def encoded(fmt: str, size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 200).save(out, format=fmt)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels in a few KB (Pillow would try to allocate it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1_000_000, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD_PNG = encoded("PNG")
WHITE_MASK = encoded("PNG", mode="L")  # grey 200: repaints everywhere

BAD_FILES: dict[str, bytes] = {
    "empty": b"",
    "nul": b"\x00",
    "text": b"not an image at all",
    "nul-padded png magic": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    "truncated png": GOOD_PNG[: len(GOOD_PNG) // 2],
    "bomb 30000x30000": bomb_png(30_000, 30_000),
    "bomb 1x100000": bomb_png(1, 100_000),
    "real 1x100000": encoded("PNG", (1, 100_000)),
    "zero-width header": bomb_png(0, 64),
    "gif": encoded("GIF"),
    "bmp": encoded("BMP"),
    "tiff": encoded("TIFF"),
    "over the byte limit": b"\x89PNG\r\n\x1a\n" + b"\x00" * (MAX_UPLOAD_BYTES + 1),
}

BAD_IMAGE_VALUES: dict[str, Any] = {
    **{f"base64 of {name}": b64(data) for name, data in BAD_FILES.items() if name != "empty"},
    "empty string": "",
    "nul": "\x00",
    "nul in base64": b64(GOOD_PNG)[:20] + "\x00" + b64(GOOD_PNG)[20:],
    "not base64": "not base64!",
    "bad padding": "QUJD" + "A",
    "data url of nothing": "data:image/png;base64,",
    "giant string": "A" * (MAX_UPLOAD_BYTES * 2),
    "number": 12345,
    "huge number": 10**30,
    "object": {"a": 1},
    "true": True,
}

BAD_URL_VALUES: dict[str, Any] = {
    "nul": "http://hooks.example.com/\x00",
    "nul host": "http://hooks\x00.example.com/",
    "only nul": "\x00",
    "empty": "",
    "space": "http://hooks.example.com/a b",
    "crlf": "http://hooks.example.com/\r\nX: y",
    "giant": "http://hooks.example.com/" + "a" * 100_000,
    "userinfo": "http://hooks.example.com@127.0.0.1/",
    "decimal ip": "http://2130706433/",
    "ftp": "ftp://hooks.example.com/",
    "javascript": "javascript:alert(1)",
    "no host": "http:///x",
    "bad port": "http://hooks.example.com:99999/",
    "number": 12345,
    "list": ["http://hooks.example.com/"],
    "object": {"url": "http://hooks.example.com/"},
    "true": True,
}

BAD_SIZES: dict[str, Any] = {
    "zero": 0,
    "negative": -64,
    "minus one": -1,
    "too big": 20_000,
    "huge": 10**30,
    "int64 overflow": 2**63,
    "not multiple of 8": 65,
    "fraction": 64.5,
    "word": "sixty-four",
    "nul": "\x00",
    "null": None,
    "list": [64],
}


# --- the service, on each database -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def svc(request, tmp_path_factory, models_dir) -> Iterator[Services]:
    database_url = None
    if request.param == "postgresql":
        from tests.infra.postgres import fresh_database

        database_url = fresh_database(request.getfixturevalue("pg_server"))
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("hostile"),
        models_dir=models_dir,
        database_url=database_url,
        sync_timeout_seconds=0.5,  # an accepted request would end in a 504 (no worker): the corpus would catch it
        limits=Limits(max_upload_bytes=MAX_UPLOAD_BYTES, max_upload_pixels=MAX_UPLOAD_PIXELS),
        webhooks=WebhookSettings(secret="whsec-test", enabled=False),
    )
    services = Services.open(settings)
    yield services
    services.close()


@pytest.fixture(scope="module")
def api(svc: Services) -> Iterator[TestClient]:
    with TestClient(create_app(svc, workers=0), raise_server_exceptions=False) as client:
        yield client


def refusal(response, where: str) -> str | None:  # type: ignore[no-untyped-def]
    """None if the response is a 4xx naming a field; else what is wrong with it."""
    if not 400 <= response.status_code < 500:
        return f"{where}: {response.status_code} {response.text[:200]}"
    error = response.json().get("error") or {}
    if not (error.get("field") or error.get("param")):
        return f"{where}: {response.status_code} names no field: {response.text[:200]}"
    return None


def stored(svc: Services) -> list:
    return [p for p in svc.blobs.root.rglob("*") if p.is_file()]


def check_all(cases: Iterator[tuple[str, Any]], svc: Services, *, blobs: bool = True) -> None:
    """Send every case (the generator runs here) and collect what went wrong, so one run lists every gap."""
    before, jobs_before = set(stored(svc)), {j.id for j in svc.store.list(limit=500)}
    problems = [p for where, response in cases if (p := refusal(response, where))]
    assert problems == [], "\n".join(problems)
    assert {j.id for j in svc.store.list(limit=500)} == jobs_before, "a hostile request was queued"
    if blobs:
        assert set(stored(svc)) == before, "a hostile request stored a blob"


# --- native API -------------------------------------------------------------------------------------------------------


def test_native_jobs_refuse_every_hostile_value(api, svc):
    def cases() -> Iterator[tuple[str, Any]]:
        for route in ("/v1/jobs", "/v1/generate"):
            for name, value in BAD_URL_VALUES.items():
                yield f"{route} webhook_url {name}", api.post(route, json={**SMALL, "webhook_url": value})
            for name, value in {"100000 events": ["completed"] * 100_000, "unknown": ["exploded"], "nul": ["\x00"],
                                "string": "completed", "null item": [None]}.items():  # fmt: skip
                yield f"{route} webhook_events {name}", api.post(route, json={**SMALL, "webhook_events": value})
            for name, value in BAD_IMAGE_VALUES.items():
                yield f"{route} init_image {name}", api.post(route, json={**SMALL, "init_image": value})
                body = {**SMALL, "init_image": b64(GOOD_PNG), "mask_image": value}
                yield f"{route} mask_image {name}", api.post(route, json=body)
            for field in ("width", "height"):
                for name, value in BAD_SIZES.items():
                    yield f"{route} {field} {name}", api.post(route, json={**SMALL, field: value})
            yield f"{route} 8192² inpaint", api.post(
                route, json={**SMALL, "width": 8192, "height": 8192, "init_image": b64(GOOD_PNG),
                             "mask_image": b64(WHITE_MASK)},
            )  # fmt: skip

    check_all(cases(), svc, blobs=False)  # see the next test


def test_a_refused_native_request_stores_nothing(api, svc):
    before = set(stored(svc))
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))  # a source no earlier request stored
    out = io.BytesIO()
    noise.save(out, format="PNG")
    body = {**SMALL, "init_image": b64(out.getvalue()), "mask_image": "not base64!"}
    assert api.post("/v1/jobs", json=body).status_code == 422
    assert set(stored(svc)) == before


def test_key_names_with_nul_or_controls_are_refused(api, svc):
    def cases() -> Iterator[tuple[str, Any]]:
        for name in ("a\x00b", "\x00", "line\nbreak", "tab\there", "x" * 10_000, "", 5, None):
            yield f"/v1/keys name {name!r:.20}", api.post("/v1/keys", json={"name": name})

    check_all(cases(), svc)


# --- A1111 API --------------------------------------------------------------------------------------------------------


def test_a1111_refuses_every_hostile_value(api, svc):
    def cases() -> Iterator[tuple[str, Any]]:
        for name, value in BAD_IMAGE_VALUES.items():
            yield f"img2img init_images {name}", api.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [value]})
            if name != "empty string":  # A1111 reads an empty mask as no mask, and so does darkroom
                body = {**SMALL, "init_images": [b64(GOOD_PNG)], "mask": value}
                yield f"img2img mask {name}", api.post("/sdapi/v1/img2img", json=body)
            yield f"png-info image {name}", api.post("/sdapi/v1/png-info", json={"image": value})
        yield "img2img init_images not a list", api.post("/sdapi/v1/img2img", json={**SMALL, "init_images": "x"})
        yield "img2img init_images empty", api.post("/sdapi/v1/img2img", json={**SMALL, "init_images": []})
        for route in ("txt2img", "img2img"):
            for field in ("width", "height", "steps", "batch_size", "n_iter"):
                for name, value in BAD_SIZES.items():
                    if field not in ("width", "height") and name == "not multiple of 8":
                        continue
                    body = {**SMALL, "init_images": [b64(GOOD_PNG)], "mask": b64(WHITE_MASK), field: value}
                    yield f"{route} {field} {name}", api.post(f"/sdapi/v1/{route}", json=body)

    check_all(cases(), svc)


# --- OpenAI API -------------------------------------------------------------------------------------------------------


BAD_OPENAI_SIZES = ["0x0", "-64x64", "64x-64", "20000x20000", "99999x99999", "64x0", "\x00", "64x64\x00", "x" * 10_000,
                    "65x64", "1e9x1e9", "64"]  # fmt: skip
BAD_COUNTS = ["0", "-1", "100", "99999999999999999999", "1e309", "abc", "\x00"]


def test_openai_edits_refuse_every_hostile_value(api, svc):
    def post(data: dict, image: bytes = GOOD_PNG, mask: bytes | None = None) -> Any:
        files = {"image": ("a.png", image, "image/png")}
        if mask is not None:
            files["mask"] = ("m.png", mask, "image/png")
        return api.post("/v1/images/edits", data={"prompt": "x", **data}, files=files)

    def cases() -> Iterator[tuple[str, Any]]:
        for name, data in BAD_FILES.items():
            yield f"edits image {name}", post({}, image=data)
            yield f"edits mask {name}", post({}, mask=data)
        for size in BAD_OPENAI_SIZES:
            yield f"edits size {size!r:.20}", post({"size": size}, mask=GOOD_PNG)
        for n in BAD_COUNTS:
            yield f"edits n {n!r}", post({"n": n}, mask=GOOD_PNG)
        yield "edits no image", api.post("/v1/images/edits", data={"prompt": "x"})
        yield "edits image as a field", api.post("/v1/images/edits", data={"prompt": "x", "image": "abc"})

    check_all(cases(), svc)


def test_openai_generations_refuse_every_hostile_value(api, svc):
    def cases() -> Iterator[tuple[str, Any]]:
        for size in BAD_OPENAI_SIZES:
            body = {"prompt": "x", "size": size}
            yield f"generations size {size!r:.20}", api.post("/v1/images/generations", json=body)
        for n in [0, -1, 100, 10**30, "abc", [1]]:
            yield f"generations n {n!r}", api.post("/v1/images/generations", json={"prompt": "x", "n": n})
        for steps in [-1, 10**9, 10**30]:
            body = {"prompt": "x", "steps": steps}
            yield f"generations steps {steps!r}", api.post("/v1/images/generations", json=body)

    check_all(cases(), svc)
