"""Raw-socket HTTP for tests of the API's edge: bodies that stream, requests that stall, and memory watched while
they do (httpx would buffer or retry what these tests must control)."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


def send_chunked(port: int, headers: str, total_bytes: int, chunk: int = 1024 * 1024) -> tuple[int, int, bytes]:
    """POST a chunked body of up to `total_bytes`, stopping as soon as the server answers.
    Returns (status, bytes sent, response head)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n{headers}\r\n".encode()
    )
    piece = f"{chunk:x}\r\n".encode() + b"A" * chunk + b"\r\n"
    sent = 0
    try:
        while sent < total_bytes:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed the connection
            sent += chunk
        head = read_response(sock)
    finally:
        sock.close()
    return int(head.split(b" ", 2)[1]), sent, head


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0
    )
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


@contextmanager
def peak_rss_of(proc: psutil.Process) -> Iterator[dict[str, int]]:
    """The largest resident set size of `proc` while the block runs (sampled), and its growth over the start."""
    result = {"before": proc.memory_info().rss, "peak": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            result["peak"] = max(result["peak"], proc.memory_info().rss)
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["growth"] = result["peak"] - result["before"]
