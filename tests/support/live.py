"""A FastAPI app served by uvicorn on a loopback port from a thread: real HTTP for clients that bring their own
transport (the openai package, darkroom's SDK) without the seconds a separate process costs to start."""

from __future__ import annotations

import threading
import time

import uvicorn

from darkroom.api import wire
from tests.integration.harness import free_port


class LiveServer:
    def __init__(self, app, host: str = "127.0.0.1") -> None:  # type: ignore[no-untyped-def]
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level="warning", lifespan="on", http=wire.protocol_class()
        )  # the HTTP protocol `darkroom serve` runs
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
