"""Local blob store and the provenance chunks written into every PNG."""

from __future__ import annotations

import pytest
from PIL import Image

from darkroom.errors import NotFound
from darkroom.safety.provenance import a1111_parameters, encode_png, read_png
from darkroom.storage.local import LocalBlobStore

PROV = {
    "seed": 42,
    "request": {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "steps": 20,
        "sampler": "Euler a",
        "guidance_scale": 7.5,
        "width": 512,
        "height": 768,
        "strength": 0.6,
        "init_image": "blob:x",
    },
    "model": {"id": "tiny", "sha256": "abcdef0123456789" + "0" * 48},
    "versions": {"darkroom": "0.1.0"},
}


def test_blobs_are_content_addressed_and_atomic(tmp_path):
    store = LocalBlobStore(tmp_path)
    digest, key = store.put(b"hello", "text/plain")
    assert key == f"{digest[:2]}/{digest[2:4]}/{digest}"
    assert store.put(b"hello", "text/plain") == (digest, key)
    assert store.get(key) == b"hello" and store.exists(key)
    assert not list(tmp_path.rglob(".tmp-*"))
    store.delete(key)
    with pytest.raises(NotFound):
        store.get(key)


@pytest.mark.parametrize("key", ["../../etc/passwd", "/etc/passwd", "ab/cd/../../x", "ab/cd/" + "g" * 64])
def test_blob_keys_cannot_escape_the_root(tmp_path, key):
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(NotFound):
        store.get(key)


def test_a1111_parameters_text():
    text = a1111_parameters(PROV)
    assert text.splitlines()[0] == "a lighthouse"
    assert text.splitlines()[1] == "Negative prompt: fog"
    assert text.splitlines()[2] == (
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model hash: abcdef0123, "
        "Model: tiny, Denoising strength: 0.6, Version: darkroom 0.1.0"
    )


def test_png_round_trip_keeps_both_chunks():
    png = encode_png(Image.new("RGB", (16, 16), (1, 2, 3)), PROV)
    meta = read_png(png)
    assert {k: meta["provenance"][k] for k in PROV} == PROV
    assert "Seed: 42" in meta["parameters"]
