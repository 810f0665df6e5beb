"""A doorbell between the processes of one machine that share a SQLite database.

SQLite has no LISTEN/NOTIFY. A process learns of another's commits from `PRAGMA data_version`, which `ChangeFeed`
checks every `check_seconds`: fine as a fallback, but a job handed from the API process to a worker process (and its
result handed back) would wait for that tick on each side. So each feed also rings: after every write it commits, a
process sends one datagram to every other process on the same database, and their feeds read at once.

How peers find each other: every feed binds a Unix datagram socket in Linux's abstract namespace (no file to clean
up; the kernel frees the name when the process dies) and leaves a marker file named after it in `<database>.bells/`.
Ringing lists that folder (at most once a second) and sends a byte to each name; a name nobody holds any more
(a process that died) refuses the datagram, and its marker is removed. Sends never block: a peer whose queue is full
has unread rings already. On systems without the abstract namespace there is no doorbell, only the tick.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import sys
import time
from pathlib import Path

_LIST_EVERY = 1.0  # seconds between listings of the peers' folder


class Doorbell:
    def __init__(self, database: Path) -> None:
        path = database.resolve()
        self._prefix = "darkroom-bell-" + hashlib.sha256(str(path).encode()).hexdigest()[:16] + "-"
        self._folder = path.with_name(path.name + ".bells")
        self._name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._folder.mkdir(parents=True, exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.bind(self._address(self._name))
        (self._folder / self._name).touch()
        self._peers: list[str] = []
        self._listed = 0.0

    @staticmethod
    def available() -> bool:
        return sys.platform.startswith("linux")

    def fileno(self) -> int:
        return self._sock.fileno()

    def _address(self, name: str) -> str:
        return "\0" + self._prefix + name

    def ring(self) -> None:
        """Tell every other process on this database that something committed. Never blocks, never raises."""
        now = time.monotonic()
        if now - self._listed >= _LIST_EVERY:
            self._listed = now
            with contextlib.suppress(OSError):
                self._peers = [p.name for p in self._folder.iterdir() if p.name != self._name]
        for peer in list(self._peers):
            try:
                self._sock.sendto(b"!", self._address(peer))
            except (ConnectionRefusedError, FileNotFoundError):  # its process is gone
                with contextlib.suppress(OSError, ValueError):
                    (self._folder / peer).unlink()
                    self._peers.remove(peer)
            except OSError:  # a full queue (it has rings to read already) or anything else: the tick covers it
                pass

    def drain(self) -> None:
        """Read every pending ring (their number does not matter)."""
        with contextlib.suppress(BlockingIOError, OSError):
            while self._sock.recv(64):
                pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            (self._folder / self._name).unlink()
        self._sock.close()
