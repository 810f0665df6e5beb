"""A FastAPI app served by uvicorn on a loopback port from a thread: real HTTP for clients that bring their own
transport (the openai package, darkroom's SDK) without the seconds a separate process costs to start."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import uvicorn

from darkroom.api import wire
from tests.integration.harness import free_port


class LiveServer:
    """`http`: uvicorn's parser (`auto`, `httptools`, `h11`) under the protocol `darkroom serve` runs
    (`api/wire.py`), or a protocol class of the test's own."""

    def __init__(self, app: Any, host: str = "127.0.0.1", http: str | type[asyncio.Protocol] = "auto") -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        protocol = http if isinstance(http, type) else wire.protocol_class(http)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on", http=protocol)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("live server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
