"""One socket write per response: uvicorn's HTTP protocol over a transport that joins the writes of one loop turn.

uvicorn writes a response's status line and headers when the app sends `http.response.start`, and its body when
the app sends `http.response.body`: two `transport.write` calls, back to back for every JSON answer. uvloop's
transport sends each at once (`uv_try_write`, holding the interpreter lock), so every answer cost two `send` calls
on the loopback, each waking the client, and the client read the headers alone before the body came. Profiled in
`bench/load.py` (`py-spy record --gil` on the API process), those two writes were 18 % of the interpreter lock's
time, the headers' write alone 14 %: the thread that writes holds the lock through the system call and whatever the
kernel does in it (the loopback delivers to the reader, whose wake-up can take the CPU).

`CoalescingTransport` keeps what is written during one turn of the event loop and writes it as one buffer at the end
of that turn (`call_soon`), so a small answer goes out in one `send`. Nothing waits longer than the turn it was
written in; streamed bodies (SSE, image downloads) are written a turn later each, under uvicorn's flow control as
before. Closing or aborting the connection writes or drops what is pending first. The protocol classes below are
uvicorn's own, given this transport when a connection is made.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, cast

from uvicorn.protocols.http.h11_impl import H11Protocol


class CoalescingTransport:
    """A connection's transport whose writes in one event-loop turn leave as one."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        lone = not self._pending
        self._pending.append(bytes(data))
        if lone:
            self._loop.call_soon(self._flush)  # a lone write goes at the end of this turn
        else:
            self._flush()  # the body after the head: both go now, as one

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)  # (one item: itself, not a copy)
        self._pending.clear()
        if not self._transport.is_closing():  # the peer went away meanwhile: nothing to write to
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(data) for data in self._pending)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own (reading, extra info, …)
        return getattr(self._transport, name)


class _Coalescing:
    """Mixed into a uvicorn HTTP protocol: the connection's transport is wrapped as it is made."""

    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        coalescing = CoalescingTransport(cast(asyncio.Transport, transport), self.loop)
        super().connection_made(coalescing)  # type: ignore[misc]


class CoalescingH11Protocol(_Coalescing, H11Protocol):
    pass


@functools.cache
def protocol_class(http: str = "auto") -> type[asyncio.Protocol]:
    """The HTTP protocol class for `uvicorn.Config(http=…)`: uvicorn's httptools protocol where httptools is installed
    (`auto`, `httptools`), else its h11 one, writing through `CoalescingTransport`."""
    if http in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:
            if http == "httptools":
                raise
        else:
            return type("CoalescingHttpToolsProtocol", (_Coalescing, HttpToolsProtocol), {})
    return CoalescingH11Protocol
