"""`python -m tests.support.fault_worker worker …`: the darkroom CLI, with a device fault in some models.

For fault tests with real worker processes: the models named in `DARKROOM_TEST_FAULTY_MODELS` (comma-separated ids)
get a forward hook on their UNet that raises the RuntimeError torch raises for a CUDA fault, so the real engine, the
real worker loop and the real job store handle a device failure in a real `darkroom worker` process.
"""

from __future__ import annotations

import os
from typing import Any

from darkroom.cli import main
from darkroom.engines.diffusers_engine import DiffusersEngine, LoadedModel

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"
FAULTY = {m for m in os.environ.get("DARKROOM_TEST_FAULTY_MODELS", "").split(",") if m}
_load = DiffusersEngine._load


def _faulty_load(self: DiffusersEngine, info: Any) -> LoadedModel:
    loaded = _load(self, info)
    if info.id in FAULTY:

        def fail(module: Any, inputs: Any, output: Any) -> None:
            raise RuntimeError(CUDA_FAULT)

        loaded.txt2img.unet.register_forward_hook(fail)
    return loaded


DiffusersEngine._load = _faulty_load  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
