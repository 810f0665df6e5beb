"""One socket write per answer (`api/wire.py`): uvicorn's own HTTP protocols (httptools and h11) serving the real app
over loopback, the writes counted on the event loop's real transport underneath. A JSON answer leaves in one write;
a streamed one leaves whole and in order; a connection the server closes gets its answer first."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from darkroom.api import wire
from darkroom.api.app import create_app
from darkroom.config import Settings
from darkroom.service import Services
from tests.support.live import LiveServer
from tests.support.raw_http import read_response


class Recorded:
    """The loop's transport, unchanged, with the size of each write it is given noted down."""

    def __init__(self, transport: asyncio.Transport, writes: list[int]) -> None:
        self._transport, self._writes = transport, writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@contextmanager
def serving(app: FastAPI, http: str) -> Iterator[tuple[int, list[int]]]:
    writes: list[int] = []

    class Counting(wire.protocol_class(http)):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(Recorded(transport, writes))  # type: ignore[arg-type]

    with LiveServer(app, http=Counting) as server:
        yield server.port, writes


def exchange(port: int, request: bytes, until_closed: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        if not until_closed:
            return read_response(sock)
        data = b""
        while more := sock.recv(65536):
            data += more
        return data


def dechunked(answer: bytes) -> bytes:
    """The body of a `Transfer-Encoding: chunked` answer."""
    rest, body = answer.partition(b"\r\n\r\n")[2], b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            return body
        body, rest = body + rest[: int(size, 16)], rest[int(size, 16) + 2 :]


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_json_answer_leaves_in_one_write(tmp_path, http):
    services = Services.open(Settings(data_dir=tmp_path, workers=0, create_default_model=False))
    try:
        with serving(create_app(services, workers=0), http) as (port, writes):
            for path in ("/healthz", "/v1/samplers", "/v1/jobs/job_missing"):  # 200s and a 404 problem
                writes.clear()
                answer = exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                head, _, body = answer.partition(b"\r\n\r\n")
                assert body and len(writes) == 1 and writes[0] == len(answer), (path, writes, head)
    finally:
        services.close()


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_streamed_answer_leaves_whole_and_in_order_and_a_closed_connection_gets_its_answer(http):
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def events() -> Any:
            for i in range(5):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0.01)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/bye")
    async def bye() -> dict:
        return {"bye": True}

    with serving(app, http) as (port, writes):
        streamed = exchange(port, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", until_closed=True)
        assert dechunked(streamed) == b"".join(f"data: {i}\n\n".encode() for i in range(5))
        assert len(writes) > 1  # streamed as it was produced, not held to the end
        closed = exchange(port, b"GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", until_closed=True)
        assert closed.startswith(b"HTTP/1.1 200") and closed.endswith(b'{"bye":true}')
