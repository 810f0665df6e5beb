"""The invisible watermark, the provenance that records it, the optional C2PA manifest, and `darkroom verify`."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from darkroom.cli import app as cli_app
from darkroom.config import SecuritySettings, Settings, StorageSettings
from darkroom.safety import c2pa_manifest, watermark
from darkroom.safety.provenance import encode_png, pixel_digest, read_png
from darkroom.safety.verify import UnreadableImage, _same, verify
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.worker.loop import Worker

PROV = {
    "job_id": "job_test",
    "seed": 42,
    "image_index": 0,
    "request": {
        "prompt": "a lighthouse",
        "steps": 20,
        "sampler": "Euler a",
        "guidance_scale": 7.5,
        "width": 64,
        "height": 64,
    },
    "model": {"id": "tiny", "sha256": "abcdef0123456789" + "0" * 48},
    "versions": {"darkroom": "0.1.0"},
}
needs_c2pa = pytest.mark.skipif(not c2pa_manifest.available(), reason="c2pa-python (the optional c2pa extra)")


def natural(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour blobs over a gradient: closer to a generated image than noise is."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    ramp = np.stack([x * 200 / width, y * 200 / height, (x + y) * 100 / (width + height)], axis=-1)
    blobs = np.asarray(
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(4))
    )
    return Image.fromarray(np.clip(ramp * 0.6 + blobs * 0.5, 0, 255).astype(np.uint8))


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(
        np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1).astype(np.uint8)
    )


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def save(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def reopen(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).mean()
    return float(10 * np.log10(255**2 / mse))


@pytest.mark.parametrize(
    "image",
    [natural(64, 64), natural(160, 96, seed=1), gradient(512, 512), noise(256, 256), natural(93, 67, seed=2)],
    ids=["64x64", "160x96", "gradient-512", "noise-256", "odd-93x67"],
)
def test_the_mark_survives_a_png_round_trip(image):
    marked = watermark.embed(image, bytes.fromhex("0badf00d"))
    found = watermark.detect(reopen(save(marked)))
    assert found.present and found.bit_accuracy == 1.0 and found.payload == "0badf00d"
    assert psnr(image, marked) > 45, "invisible: about 49 dB"


def _marked_with_full_block_dct(image: Image.Image, tag: bytes) -> Image.Image:
    """The scheme as its docstring states it, by the book: a full DCT of every 4x4 block of the Haar LL band, the
    carriers quantised, the full inverse DCT, each LL change spread over its 2x2 pixels. The module computes only the
    four carriers (a projection on their basis patterns); the pixels must come out the same."""
    from scipy.fft import dctn, idctn

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    luma = rgb @ watermark._LUMA
    nby, nbx = luma.shape[0] // 8, luma.shape[1] // 8
    ll = luma[: nby * 8, : nbx * 8].reshape(nby * 4, 2, nbx * 4, 2).sum(axis=(1, 3)) / 2.0
    blocks = dctn(ll.reshape(nby, 4, nbx, 4).transpose(0, 2, 1, 3), axes=(2, 3), norm="ortho")
    assign, dither = watermark._layout(nby, nbx)
    offset = dither + watermark._bits(watermark.MARKER + tag)[assign] * (watermark._STEP / 2)
    rows, cols = zip(*watermark._COEFFICIENTS, strict=True)
    current = blocks[:, :, rows, cols]
    delta = np.zeros_like(blocks)
    delta[:, :, rows, cols] = np.round((current - offset) / watermark._STEP) * watermark._STEP + offset - current
    pixels = idctn(delta, axes=(2, 3), norm="ortho").transpose(0, 2, 1, 3).reshape(nby * 4, nbx * 4) / 2.0
    rgb[: nby * 8, : nbx * 8] += np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1)[..., None]
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("image", [natural(64, 64), natural(93, 67, seed=2), gradient(512, 256), noise(128, 200)])
def test_the_carriers_alone_mark_exactly_as_the_full_block_dct(image):
    tag = bytes.fromhex("0badf00d")
    assert np.array_equal(np.asarray(watermark.embed(image, tag)), np.asarray(_marked_with_full_block_dct(image, tag)))


@pytest.mark.parametrize(
    "image",
    [noise(256, 256, seed=3), Image.new("RGB", (128, 128), (90, 120, 200)), gradient(512, 256), natural(512, 512)],
    ids=["noise", "flat", "gradient", "natural"],
)
def test_unmarked_images_are_negative(image):
    found = watermark.detect(reopen(save(image)))
    assert not found.present and found.payload is None and found.bit_accuracy < watermark.THRESHOLD


def test_no_false_positives_over_many_unmarked_images():
    rng = np.random.default_rng(7)
    accuracies = []
    for i in range(240):
        width, height = (int(rng.choice([64, 96, 128, 200])) for _ in range(2))
        image = [
            noise(width, height, seed=i),
            natural(width, height, seed=i),
            gradient(width, height),
            Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3))),
        ][i % 4]
        found = watermark.detect(image)
        assert not found.present, f"false positive on image {i}"
        accuracies.append(found.bit_accuracy)
    assert 0.4 < np.mean(accuracies) < 0.6, "unmarked images decode to coin flips"


def test_the_mark_survives_jpeg_q90_but_not_a_resize():
    image = natural(512, 512, seed=4)
    marked = watermark.embed(image, bytes.fromhex("12345678"))
    assert watermark.detect(reopen(save(marked, "JPEG", quality=90))).payload == "12345678"
    assert not watermark.detect(marked.resize((460, 460), Image.LANCZOS)).present, "documented limit: grid moves"


def test_only_luma_changes_and_alpha_is_kept():
    image = natural(128, 128, seed=5)
    rgba = image.copy()
    rgba.putalpha(Image.fromarray(np.full((128, 128), 77, np.uint8)))
    marked = watermark.embed(rgba, bytes(4))
    assert marked.mode == "RGBA" and np.all(np.asarray(marked)[..., 3] == 77)
    delta = np.asarray(marked.convert("RGB"), int) - np.asarray(image, int)
    assert np.abs(delta).max() <= 6
    assert np.abs(delta[..., 0] - delta[..., 1]).max() <= 1, "the same change on every channel: chroma untouched"
    assert watermark.detect(marked).present


def test_images_below_the_minimum_are_recorded_not_marked():
    png = encode_png(natural(64, 48), PROV)
    record = read_png(png)["provenance"]["watermark"]
    assert record["applied"] is False and "smaller than 64x64" in record["reason"]
    found = watermark.detect(reopen(png))
    assert not found.present and found.bit_accuracy is None and "64x64" in found.reason


def test_encode_png_records_the_mark_and_keeps_provenance_readable():
    png = encode_png(natural(96, 64), PROV)
    meta = read_png(png)
    assert "Seed: 42" in meta["parameters"]
    prov = meta["provenance"]
    assert {k: prov[k] for k in PROV} == PROV
    assert prov["watermark"]["applied"] is True and prov["watermark"]["method"] == watermark.METHOD
    assert prov["watermark"]["payload"] == watermark.detect(reopen(png)).payload
    assert prov["pixels_sha256"] == pixel_digest(reopen(png))


def test_watermark_false_leaves_pixels_alone_and_says_so():
    image = natural(128, 128)
    png = encode_png(image, PROV, watermark=False)
    assert np.array_equal(np.asarray(reopen(png)), np.asarray(image))
    assert read_png(png)["provenance"]["watermark"] == {"applied": False, "reason": "disabled (security.watermark)"}
    report = verify(png)
    assert not report["watermark"]["present"] and report["watermark"]["matches_provenance"] is None


def test_identical_pixels_get_identical_marks_whatever_the_job():
    """Seeded runs stay reproducible: the payload comes from the pixels, not from the job id."""
    image = natural(128, 128, seed=6)
    first = reopen(encode_png(image, {**PROV, "job_id": "job_a"}))
    second = reopen(encode_png(image, {**PROV, "job_id": "job_b"}))
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_verify_reports_a_marked_output_in_full():
    png = encode_png(natural(128, 128), PROV)
    report = verify(png)
    assert report["file"] == {"format": "PNG", "width": 128, "height": 128, "sha256": report["file"]["sha256"]}
    assert report["watermark"]["present"] and report["watermark"]["matches_provenance"] is True
    prov = report["provenance"]
    assert prov["present"] and prov["job_id"] == "job_test" and prov["seed"] == 42 and prov["pixels_match"] is True
    assert prov["model"] == {"id": "tiny", "sha256": PROV["model"]["sha256"]}


def test_verify_catches_edited_pixels_and_borrowed_provenance():
    png = encode_png(natural(128, 128), PROV)
    edited = np.asarray(reopen(png)).copy()
    edited[10:20, 10:20] = 255
    with_old_chunks = with_chunks_of(png, save(Image.fromarray(edited)))
    report = verify(with_old_chunks)
    assert report["watermark"]["present"], "a small edit leaves the mark"
    assert report["provenance"]["pixels_match"] is False
    other = encode_png(natural(128, 128, seed=9), PROV)
    borrowed = verify(with_chunks_of(other, save(reopen(png))))
    assert borrowed["watermark"]["present"] and borrowed["watermark"]["matches_provenance"] is False


def test_verify_a_jpeg_copy_finds_the_mark_without_provenance():
    jpeg = save(reopen(encode_png(natural(256, 256), PROV)), "JPEG", quality=90)
    report = verify(jpeg)
    assert report["file"]["format"] == "JPEG" and report["watermark"]["present"]
    assert report["provenance"] == {"present": False}


@pytest.mark.parametrize("data", [b"not an image", save(natural(64, 64))[:200]], ids=["text", "truncated"])
def test_verify_refuses_unreadable_files(data):
    with pytest.raises(UnreadableImage):
        verify(data)


def test_cli_verify_exit_codes_and_json(tmp_path):
    marked, plain, junk = tmp_path / "marked.png", tmp_path / "plain.png", tmp_path / "junk.png"
    marked.write_bytes(encode_png(natural(128, 128), PROV))
    plain.write_bytes(encode_png(natural(128, 128), PROV, watermark=False))
    junk.write_bytes(b"\x89PNG but not really")
    runner = CliRunner()
    env = {"DARKROOM_DATA_DIR": str(tmp_path / "data")}

    found = runner.invoke(cli_app, ["verify", str(marked), "--json"], env=env)
    assert found.exit_code == 0, found.output
    report = json.loads(found.stdout)
    assert report["watermark"]["present"] and report["watermark"]["bit_accuracy"] == 1.0
    assert report["provenance"]["job_id"] == "job_test"

    missing = runner.invoke(cli_app, ["verify", str(plain), "--json"], env=env)
    assert missing.exit_code == 1 and json.loads(missing.stdout)["watermark"]["present"] is False

    human = runner.invoke(cli_app, ["verify", str(marked)], env=env)
    assert human.exit_code == 0 and "watermark:  present" in human.stdout and "pixels unchanged" in human.stdout

    assert runner.invoke(cli_app, ["verify", str(junk)], env=env).exit_code == 2
    assert runner.invoke(cli_app, ["verify", str(tmp_path / "absent.png")], env=env).exit_code == 2


@needs_c2pa
def test_c2pa_manifest_is_signed_trusted_and_breaks_when_the_file_changes(tmp_path):
    identity = tmp_path / "data" / "c2pa"
    png = encode_png(natural(128, 128), PROV, c2pa_dir=identity)
    anchor = c2pa_manifest.trust_anchor(identity)
    c2pa = verify(png, trust_anchors=anchor)["c2pa"]
    assert c2pa["present"] and c2pa["validation_state"] == "Trusted" and c2pa["failures"] == []
    assert c2pa["digital_source_type"] == c2pa_manifest.TRAINED_ALGORITHMIC_MEDIA
    assert c2pa["matches_provenance"] is True and c2pa["generator"].startswith("darkroom")

    stranger = verify(png)["c2pa"]
    assert stranger["validation_state"] == "Valid" and "signingCredential.untrusted" in stranger["failures"]

    forged = rewrite_text(png, "parameters", lambda text: text.replace("Seed: 42", "Seed: 43"))
    assert read_png(forged)["parameters"] != read_png(png)["parameters"]
    broken = verify(forged, trust_anchors=anchor)["c2pa"]
    assert broken["validation_state"] == "Invalid" and "assertion.dataHash.mismatch" in broken["failures"]

    assert (identity / "key.pem").stat().st_mode & 0o077 == 0, "the signing key is private to its owner"
    assert c2pa_manifest.load_identity(identity).ca_pem == anchor, "made once, then reused"


@needs_c2pa
def test_c2pa_match_survives_a_float_reprinted_one_ulp_off_but_not_a_changed_value(tmp_path):
    """The C2PA library prints some full-precision floats (timings) one ULP off; that is the same provenance."""
    identity = tmp_path / "c2pa"
    prov = {**PROV, "timings": {"engine_s": 0.22565230577485962}}
    png = encode_png(natural(128, 128), prov, c2pa_dir=identity)
    assert verify(png, trust_anchors=c2pa_manifest.trust_anchor(identity))["c2pa"]["matches_provenance"] is True
    # Anything more than float print noise is still a difference.
    assert not _same({"engine_s": 0.2256}, {"engine_s": 0.2257})
    assert not _same({"seed": 1}, {"seed": 1.0}) and not _same({"a": 1}, {"a": 1, "b": 2})


def zlib_level_class(png: bytes) -> int:
    """zlib's FLEVEL of the first IDAT chunk: 0 for levels 0-1, 1 for 2-5, 2 for 6 (the default), 3 for 7-9."""
    start = png.index(b"IDAT") + 4
    return png[start + 1] >> 6


@pytest.mark.parametrize("mark", [True, False], ids=["watermark-on", "watermark-off"])
def test_a_worker_output_verifies(tmp_path, models_dir, mark):
    """Also: `storage.png_compress_level` reaches the stored file (default 6; 1 with the watermark off here), and
    changes its size only: the pixels and the provenance verify either way."""
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        progress_interval=0,
        batch_window_seconds=0,
        security=SecuritySettings(watermark=mark, c2pa=mark),
        storage=StorageSettings() if mark else StorageSettings(png_compress_level=1),
    )
    services = Services.open(settings)
    worker = Worker(settings, services.store, services.blobs, services.make_engine, worker_id="w1")
    try:
        body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2, "seed": 3, "model": "tiny-diffusers"}
        job = services.store.create(GenerationRequest(**body))[0]
        worker.process_batch(worker.claim())
        assert services.store.get(job.id).state is JobState.succeeded
        (image,) = services.store.images_for(job.id)
        stored = services.blobs.get(image.blob_key)
        report = verify(stored, trust_anchors=c2pa_manifest.trust_anchor(tmp_path / "data" / "c2pa"))
    finally:
        if worker._engine is not None:
            worker._engine.close()
        services.close()
    assert report["watermark"]["present"] is mark
    assert zlib_level_class(stored) == (2 if mark else 0)
    assert report["provenance"]["job_id"] == job.id and report["provenance"]["pixels_match"] is True
    assert report["provenance"]["model"]["id"] == "tiny-diffusers" and report["provenance"]["seed"] == 3
    if mark:
        assert report["watermark"]["matches_provenance"] is True
    if mark and c2pa_manifest.available():
        assert report["c2pa"]["validation_state"] == "Trusted" and report["c2pa"]["matches_provenance"] is True
    else:
        assert report["c2pa"]["present"] in (False, None)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunks.append((data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return chunks


def png_bytes(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def with_chunks_of(source: bytes, pixels: bytes) -> bytes:
    """`pixels`' image data under `source`'s text chunks: an edit that kept the metadata."""
    text = [c for c in png_chunks(source) if c[0] in (b"tEXt", b"iTXt", b"zTXt")]
    chunks = png_chunks(pixels)
    return png_bytes(chunks[:1] + text + chunks[1:])


def rewrite_text(data: bytes, key: str, change) -> bytes:
    """`data` with one tEXt chunk's value changed and its CRC fixed: a PNG that still decodes."""
    out = []
    for kind, body in png_chunks(data):
        name, _, value = body.partition(b"\0")
        if kind == b"tEXt" and name == key.encode():
            body = name + b"\0" + change(value.decode("latin-1")).encode("latin-1")
        out.append((kind, body))
    return png_bytes(out)
