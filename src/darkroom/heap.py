"""The cyclic garbage collector, told which objects live as long as the process.

A full (generation 2) collection walks every object the collector tracks. After start-up a darkroom process holds
hundreds of thousands of them (FastAPI's routes and pydantic's models, SQLAlchemy's tables and statement caches;
torch and diffusers in a worker), none of which will ever be garbage. Under load each full collection paused the
process for 50-145 ms and collected almost nothing (measured in an API process taking submits from 200 clients:
the tail of the accepted submits' latency). `settle()` moves what exists at start-up out of the collector's sight
(`gc.freeze`), so later collections walk only what was allocated since.

Only the long-running commands call it (`darkroom serve`, `darkroom worker`), once, when the process is set up.
Freezing is cheap, but frozen cyclic garbage is never freed, so a library caller (a test creating many apps in one
process) must not.
"""

from __future__ import annotations

import gc


def settle() -> None:
    gc.freeze()
