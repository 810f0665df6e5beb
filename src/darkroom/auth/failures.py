"""Failed logins per client address: the brake before authentication, and the audit log's aggregation.

A client that keeps sending bad API keys is guessing or broken. Each failure used to append an audit row, so a
flood of bad tokens became a flood of writes on an append-only table. Now, per address and one-minute window:
- the first `audited_per_minute` failures are recorded one by one (who claimed which key id, and why);
- the rest are only counted, and one summary row (`details.summary`, with the counts) is appended once the window
  is over (on the next failure from anywhere, or at shutdown);
- past `per_minute` failures the address gets 429 `too_many_failures` before any key is looked up, until the window
  ends.
Counts live in this process: each API node brakes on its own (no write per failure), which bounds a guesser at
`per_minute` tries per node and minute."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass

from darkroom import clock
from darkroom.auth.audit import AuditLog
from darkroom.errors import RateLimited

WINDOW_SECONDS = 60


@dataclass
class _Window:
    start: int  # the window's first second (unix time)
    failures: int = 0
    refused: int = 0


class LoginFailures:
    def __init__(self, audit: AuditLog, *, per_minute: int = 20, audited_per_minute: int = 5) -> None:
        self.audit = audit
        self.per_minute = per_minute
        self.audited_per_minute = audited_per_minute
        self._windows: dict[str | None, _Window] = {}
        self._lock = threading.Lock()

    def refusing(self, ip: str | None) -> bool:
        """Whether `check` would refuse this address now (nothing counted)."""
        return self._used_up(ip, clock.utcnow().timestamp()) is not None

    def check(self, ip: str | None) -> None:
        """Before authentication: 429 when this address used up its failures for the current minute."""
        now = clock.utcnow().timestamp()
        with self._lock:
            window = self._used_up(ip, now)
            if window is None:
                return
            window.refused += 1
        raise RateLimited(
            f"too many failed logins from this address: {self.per_minute} a minute",
            limit={
                "name": "auth_failures_per_minute",
                "scope": f"ip:{ip}",
                "limit": self.per_minute,
                "used": window.failures,
            },
            retry_after=int(window.start + WINDOW_SECONDS - now) + 1,
            code="too_many_failures",
        )

    def _used_up(self, ip: str | None, now: float) -> _Window | None:
        """The address's window for the current minute when its failures are used up, else None."""
        window = self._windows.get(ip)
        if window is None or window.start != _start(now) or window.failures < self.per_minute:
            return None
        return window

    def failed(self, key_id: str | None, ip: str | None, request_id: str | None, reason: str) -> None:
        """After a failed authentication: count it; audit it one by one while under the per-minute allowance."""
        now = clock.utcnow().timestamp()
        with self._lock:
            ended = self._take_ended(_start(now))
            window = self._windows.get(ip)
            if window is None:
                window = self._windows[ip] = _Window(_start(now))
            window.failures += 1
            audit_this = window.failures <= self.audited_per_minute
        if audit_this:
            self.audit.denied_login(key_id, ip, request_id, reason)
        self._summarise(ended)

    def flush(self) -> None:
        """Write the summaries of every window, ended or not (at shutdown)."""
        with self._lock:
            ended = self._take_ended(None)
        self._summarise(ended)

    def _take_ended(self, current: int | None) -> list[tuple[str | None, _Window]]:
        ended = [(ip, w) for ip, w in self._windows.items() if current is None or w.start != current]
        for ip, _ in ended:
            del self._windows[ip]
        return ended

    def _summarise(self, ended: list[tuple[str | None, _Window]]) -> None:
        for ip, window in ended:
            unrecorded = window.failures - min(window.failures, self.audited_per_minute)
            if unrecorded or window.refused:
                self.audit.denied_logins_summary(
                    ip,
                    {
                        "window_start": dt.datetime.fromtimestamp(window.start, dt.UTC).isoformat(),
                        "window_seconds": WINDOW_SECONDS,
                        "failures": window.failures,
                        "recorded": window.failures - unrecorded,
                        "refused": window.refused,
                    },
                )


def _start(now: float) -> int:
    return int(now // WINDOW_SECONDS) * WINDOW_SECONDS
