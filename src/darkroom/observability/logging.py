"""One log format for every process: time, level, process role, logger, message.

A start-up should say what an operator needs (where the data is, which models, which address) and nothing else, so
the libraries' own chatter is turned down here, once, before they are imported: Alembic's per-step INFO lines (a real
migration is reported in one line by darkroom.jobs.db), transformers/diffusers advisories and progress bars, and
Python warnings raised inside third-party packages (deprecations meant for library authors, not for operators)."""

from __future__ import annotations

import logging
import os
import warnings

# Loggers that speak only when something is wrong (or, for the HTTP ones, is about to be).
_QUIET = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "uvicorn.access": logging.WARNING,
    "alembic": logging.WARNING,
    "transformers": logging.ERROR,
    "diffusers": logging.ERROR,
    "huggingface_hub": logging.ERROR,
    "torch": logging.ERROR,
}
# Read by transformers / diffusers / huggingface_hub when they are first imported.
_LIBRARY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
THIRD_PARTY_MODULES = (
    r"(torch|torchsde|diffusers|transformers|accelerate|huggingface_hub|safetensors|scipy|numpy)(\.|$)"
)


def setup(level: str = "INFO", role: str = "darkroom") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)-7s {role}[%(process)d] %(name)s: %(message)s",
        force=True,
    )
    quiet_libraries()


def quiet_libraries() -> None:
    """Turn the libraries down (env defaults, logger levels, warning filters); an explicit env setting wins."""
    for name, value in _LIBRARY_ENV.items():
        os.environ.setdefault(name, value)
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", module=THIRD_PARTY_MODULES)
    # Deprecations surface at the caller's line (stacklevel), which may be ours; they are for developers, who see
    # them in the test suite, not in a server's log.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.captureWarnings(True)  # what is left arrives in the log format above
