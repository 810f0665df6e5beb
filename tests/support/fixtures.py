"""Session-scoped tiny models (a pytest plugin: `pytest_plugins = ["tests.support.fixtures"]` in conftest.py).

Built once per test session and treated as read-only: tests that change a models folder copy these first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.tiny_models import make_diffusers_model, make_sdxl_diffusers_model, make_single_file_model

# Tiny models gain nothing from a second thread, and OpenMP threads spin badly when the (2-core) machine is busy with
# other processes: measured 13 s alone versus 260 s beside a second test run with 2 threads. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_diffusers_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder `tiny-diffusers/` holding the smoke-test pipeline's weights (seed 0)."""
    return make_diffusers_model(tmp_path_factory.mktemp("tiny-diffusers"))


@pytest.fixture(scope="session")
def tiny_single_file_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny-single.safetensors` (LDM layout, same weights as tiny_diffusers_model) beside its `tiny-single.config/`."""
    return make_single_file_model(tmp_path_factory.mktemp("tiny-single"))


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder `tiny-xl/`: SDXL's two text encoders and size conditioning in miniature."""
    return make_sdxl_diffusers_model(tmp_path_factory.mktemp("tiny-xl"))
