"""Keep the Hugging Face libraries off the network.

darkroom only ever loads weights and configs from local paths (plus `local_files_only=True` on every call); this is the
second lock on the door. huggingface_hub reads `HF_HUB_OFFLINE` once, at import, so the variable is set before the
first diffusers/transformers import and the already-imported constant is patched for good measure.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def enforce_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    constants: Any = sys.modules.get("huggingface_hub.constants")  # its flag is read at import; set it too
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
