"""A minimal HTTP/1.1 keep-alive client for load generation: one connection, one request at a time.

The benchmarks' load processes share the machine with the server they measure. Measured on the 2-core machine,
`httpx.AsyncClient` spent about 1.7 ms of CPU on each submit it sent: at 300 submits/s half a core went to the
client, taken from the server. This client writes the request bytes and reads the status line, the headers and a
`Content-Length` (or chunked) body, and nothing else (about a tenth of that), like `wrk` or `hey`. It is for
loopback load against servers the benchmark started, not a general client: no TLS, no redirects, no cookies.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


class ProtocolError(Exception):
    """The server's answer was not HTTP/1.1 this client can read."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


class Connection:
    """One keep-alive connection to `host:port`, opened on first use and again after the server closes it."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._fixed = f"Host: {host}:{port}\r\n{extra}".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> Response:
        if self._reader is not None and self._reader.at_eof():  # the server closed it while idle (keep-alive timeout)
            await self.close()
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._fixed
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode()
        self._writer.write(head + b"\r\n" + body)
        try:
            response = await self._read()
        except BaseException:
            await self.close()  # a half-read answer leaves the connection unusable
            raise
        if response.headers.get("connection", "").lower() == "close":
            await self.close()
        return response

    async def _read(self) -> Response:
        assert self._reader is not None
        try:
            raw = await self._reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError("connection closed before the answer") from exc
        lines = raw[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._chunked()
        else:
            body = await self._reader.readexactly(int(headers.get("content-length", "0")))
        return Response(int(parts[1]), headers, body)

    async def _chunked(self) -> bytes:
        assert self._reader is not None
        out = bytearray()
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await self._reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                    pass
                return bytes(out)
            out += await self._reader.readexactly(size)
            await self._reader.readexactly(2)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
