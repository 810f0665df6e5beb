"""The drop-in APIs, the SDK and webhooks against real `darkroom serve` processes over loopback: the official `openai`
package, raw A1111-style JSON, darkroom's SDK, and a webhook receiver that checks signatures."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from darkroom.client import Client, RetryPolicy, verify_webhook
from tests.support.receiver import Answer, Receiver

from .harness import Cluster, wait_until

pytestmark = pytest.mark.integration

SECRET = "integration-secret"
SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
WEBHOOKS = {
    "DARKROOM_WEBHOOKS__SECRET": SECRET,
    "DARKROOM_WEBHOOKS__ALLOW_HOSTS": "127.0.0.1",
    "DARKROOM_WEBHOOKS__BACKOFF_SECONDS": "0.2",
    "DARKROOM_WEBHOOKS__POLL_SECONDS": "0.1",
}

# Kept pixels stay within the invisible watermark's change (luma, a few levels), which marks every output.
WATERMARK_DELTA = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir):
    c = Cluster(tmp_path_factory.mktemp("compat"), models_dir, env=WEBHOOKS)
    c.start_server(workers=1)
    yield c
    c.close()


@pytest.fixture
def http(cluster):
    with cluster.client() as client:
        yield client


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64png(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def ramp() -> Image.Image:
    line = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(line, (64, 1))] * 3, axis=-1))


def centre(value_inside: int, value_outside: int, mode: str = "L") -> Image.Image:
    image = Image.new(mode, (64, 64), value_outside)
    image.paste(value_inside, (16, 16, 48, 48))
    return image


# --- the official openai package ------------------------------------------------------------------------------------


def test_openai_package_generates_edits_and_gets_openai_errors(cluster):
    oai = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="sk-any-key-works", max_retries=0, timeout=120)
    made = oai.images.generate(
        model="dall-e-2", prompt="a lighthouse", n=2, size="64x64", response_format="b64_json", extra_body={"steps": 2}
    )
    assert len(made.data) == 2 and pixels(base64.b64decode(made.data[0].b64_json)).shape == (64, 64, 3)

    linked = oai.images.generate(prompt="a lighthouse", size="64x64", response_format="url", quality="low")
    assert pixels(httpx.get(linked.data[0].url).content).shape == (64, 64, 3)

    source = ramp()
    mask = centre((0, 0, 0, 0), (0, 0, 0, 255), "RGBA")  # transparent centre: edit there
    edited = oai.images.edit(
        image=("in.png", png(source), "image/png"),
        mask=("mask.png", png(mask), "image/png"),
        prompt="a red door",
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 2},
    )
    out = pixels(base64.b64decode(edited.data[0].b64_json))
    keep = np.asarray(mask.getchannel("A")) == 255
    assert np.abs(out[keep] - np.asarray(source).astype(int)[keep]).max() <= WATERMARK_DELTA

    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(prompt="x", size="12x12")
    assert err.value.body["param"] == "size"
    oai.close()


# --- raw A1111 JSON -------------------------------------------------------------------------------------------------


def test_a1111_txt2img_img2img_and_inpainting(http):
    made = http.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 42, "batch_size": 2})
    assert made.status_code == 200, made.text
    info = json.loads(made.json()["info"])
    assert info["all_seeds"] == [42, 43] and len(made.json()["images"]) == 2

    source = ramp()
    img2img = http.post(
        "/sdapi/v1/img2img", json={**SMALL, "init_images": [b64png(source)], "denoising_strength": 0.6, "steps": 4}
    )
    assert img2img.status_code == 200, img2img.text
    assert json.loads(img2img.json()["info"])["denoising_strength"] == 0.6

    inpaint = http.post(
        "/sdapi/v1/img2img",
        json={
            **SMALL,
            "init_images": [b64png(source)],
            "mask": b64png(centre(255, 0)),
            "mask_blur": 0,
            "inpainting_fill": 1,
            "inpaint_full_res": False,
            "denoising_strength": 1.0,
        },
    )
    assert inpaint.status_code == 200, inpaint.text
    out = pixels(base64.b64decode(inpaint.json()["images"][0]))
    keep = np.asarray(centre(255, 0)) == 0
    assert np.abs(out[keep] - np.asarray(source).astype(int)[keep]).max() <= WATERMARK_DELTA
    assert np.abs(out[~keep] - np.asarray(source).astype(int)[~keep]).mean() > 1


def test_a1111_progress_during_a_run_and_interrupt(http, cluster):
    assert http.get("/sdapi/v1/progress").json()["state"]["job"] == ""
    result: dict = {}
    slow = {**SMALL, "steps": 150, "width": 256, "height": 256}
    thread = threading.Thread(target=lambda: result.update(http.post("/sdapi/v1/txt2img", json=slow).json()))
    thread.start()

    def mid_run() -> dict | None:
        p = http.get("/sdapi/v1/progress").json()
        return p if p["state"]["job"] and 0 < p["progress"] < 1 else None

    seen = wait_until(mid_run, timeout=120, what=f"progress mid-run\n{cluster.logs()}")
    assert seen["state"]["sampling_steps"] == 150 and seen["state"]["sampling_step"] > 0 and seen["eta_relative"] > 0
    assert http.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(timeout=120)
    assert result["images"] == [] and json.loads(result["info"])["state"] == "cancelled"


def test_a1111_model_switch_via_options_survives_a_restart(tmp_path, models_dir):
    c = Cluster(tmp_path, models_dir)
    try:
        c.start_server(workers=1)
        with c.client() as http:
            single = next(m for m in http.get("/sdapi/v1/sd-models").json() if m["model_name"] == "tiny-single")
            assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": single["title"]}).status_code == 200
            info = json.loads(http.post("/sdapi/v1/txt2img", json=SMALL).json()["info"])
            assert info["sd_model_name"] == "tiny-single"
        c.server.stop()
        c.start_server(workers=0)
        with c.client() as http:
            assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == single["title"]
    finally:
        c.close()


# --- the SDK --------------------------------------------------------------------------------------------------------


def test_sdk_waits_out_a_429_and_a_repeated_idempotency_key_returns_the_first_job(tmp_path, models_dir):
    c = Cluster(tmp_path, models_dir, env={"DARKROOM_LIMITS__MAX_QUEUE_DEPTH": "1"})
    try:
        c.start_server(workers=0)  # nothing runs: the queue stays full until we cancel
        with Client(c.url, retry=RetryPolicy(max_attempts=4)) as client:
            blocker = client.submit(SMALL)
            timer = threading.Timer(1.0, client.cancel, args=(blocker["id"],))
            timer.start()
            started = time.monotonic()
            job = client.submit(SMALL, idempotency_key="order-7")  # 429 queue_full, Retry-After: 5, then room
            waited = time.monotonic() - started
            timer.join()
            again = client.submit(SMALL, idempotency_key="order-7")
        assert waited >= 5.0, "the SDK did not retry before Retry-After"
        assert again["id"] == job["id"] and job["state"] == "queued"
    finally:
        c.close()


def test_sdk_generate_and_download(cluster, tmp_path):
    with Client(cluster.url) as client:
        events: list[dict] = []
        job = client.generate(SMALL, seed=9, on_event=events.append, timeout=120)
        [path] = client.download(job, tmp_path)
    assert "progress" in [e["type"] for e in events] and pixels(path.read_bytes()).shape == (64, 64, 3)


# --- webhooks -------------------------------------------------------------------------------------------------------


def test_webhook_receiver_verifies_signature_500_is_retried_and_disallowed_is_never_called(cluster):
    with (
        Receiver(script=[Answer(500), Answer(200)]) as hook,
        Receiver(host="127.0.0.2") as forbidden,
        Client(cluster.url) as client,
    ):
        job = client.generate(SMALL, webhook_url=f"{hook.url}/darkroom", timeout=120)
        blocked = client.generate(SMALL, webhook_url=f"{forbidden.url}/x", webhook_events=["started", "completed"])
        first, second = hook.wait_for(2)
        payload = verify_webhook(second.body, second.headers, SECRET)
        assert payload["job_id"] == job["id"] and payload["event"] == "succeeded"
        assert payload["job"]["images"][0]["id"] == job["images"][0]["id"]
        assert first.headers["X-Darkroom-Delivery"] == second.headers["X-Darkroom-Delivery"]

        log = wait_until(
            lambda: [d for d in client.http.get(f"/v1/jobs/{job['id']}/webhooks").json() if d["state"] == "delivered"],
            what="delivered",
        )
        assert [a["status"] for a in log[0]["log"]] == [500, 200]

        def both_refused() -> list[dict] | None:
            rows = client.http.get(f"/v1/jobs/{blocked['id']}/webhooks").json()
            return rows if len(rows) == 2 and all(d["state"] == "refused" for d in rows) else None

        assert wait_until(both_refused, what="refused") and forbidden.received == []
