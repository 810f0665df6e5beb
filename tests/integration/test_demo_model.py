"""The built-in demo model as a new user meets it: `darkroom serve` on an empty data dir installs and approves it, and
its captions reach the pixels (background and shape colour read back from the PNGs the service returns)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from darkroom.client import Client
from darkroom.demo.install import DEMO_MODEL_DIRNAME
from darkroom.demo.reading import read_picture

from .harness import Cluster

pytestmark = pytest.mark.integration

# (caption, background, shape colour): captions of the kind, at the model's defaults (64x64, its steps).
CASES = (
    ("a yellow star in the top left corner on a black background", "black", "yellow"),
    ("two small red circles on a blue background", "blue", "red"),
    ("a large white square on a green background", "green", "white"),
    ("three purple crosses on an orange background", "orange", "purple"),
)


def test_a_fresh_data_dir_serves_the_demo_model_and_captions_reach_the_pixels(tmp_path):
    cluster = Cluster(tmp_path, models_dir=None)
    try:
        cluster.start_server(workers=1)
        with Client(cluster.url) as client:
            models = client.models()
            assert [(m["id"], m["smoke_test"]) for m in models] == [(DEMO_MODEL_DIRNAME, False)]
            assert "only knows shapes" in models[0]["description"]
            for caption, background, colour in CASES:
                job = client.http.post("/v1/generate", json={"prompt": caption, "seed": 42}).json()
                assert job["state"] == "succeeded", job
                assert (job["images"][0]["width"], job["images"][0]["height"]) == (64, 64)  # the model's default
                image = Image.open(io.BytesIO(client.image(job["images"][0]["url"])))
                got = read_picture(image)
                assert (got.background, got.colour) == (background, colour), (caption, got)
            assert json.loads(json.dumps(job["provenance"]))["model"]["id"] == DEMO_MODEL_DIRNAME
    finally:
        cluster.close()
