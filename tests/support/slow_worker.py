"""`python -m tests.support.slow_worker worker …`: the darkroom CLI on a slow device.

Every UNet call of the real engine takes at least `DARKROOM_TEST_STEP_SECONDS` longer (a forward hook), so a test
can act on a worker while its job is certainly mid-run (freeze it, kill it) however fast the tiny model is."""

from __future__ import annotations

import os
import time
from typing import Any

from darkroom.cli import main
from darkroom.engines.diffusers_engine import DiffusersEngine, LoadedModel

STEP_SECONDS = float(os.environ.get("DARKROOM_TEST_STEP_SECONDS", "0.1"))
_load = DiffusersEngine._load


def _slow_load(self: DiffusersEngine, info: Any) -> LoadedModel:
    loaded = _load(self, info)
    loaded.txt2img.unet.register_forward_hook(lambda module, inputs, output: time.sleep(STEP_SECONDS))
    return loaded


DiffusersEngine._load = _slow_load  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
