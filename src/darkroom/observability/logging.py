"""One log format for every process: time, level, process role, logger, message."""

from __future__ import annotations

import logging


def setup(level: str = "INFO", role: str = "darkroom") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)-7s {role}[%(process)d] %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
