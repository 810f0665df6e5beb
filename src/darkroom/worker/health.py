"""A worker's own health: whether it should claim jobs now, and what operators see when it should not.

Two kinds of failure are the worker's problem rather than the job's, and handling them per job would be wrong:
- a *device failure* (`FatalEngineError`): every job would fail the same way, so failing jobs would only burn their
  attempts; the worker gives the job back uncharged, drops its engine and pauses;
- a *storage outage* (`StorageUnavailable`, a full disk): retrying in seconds would burn all attempts before an
  operator frees space, and leave the jobs `dead` after; the worker gives the job back uncharged and pauses for
  minutes.
Pauses double per failure in a row up to `recovery.max_backoff_seconds`; the first job that succeeds resets them.
After a device failure the rebuilt engine must pass its self-check (`Engine.check`) before the worker claims again,
so a broken device keeps its hands off the queue instead of touching (and releasing) one job per pause.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

from darkroom.config import RecoverySettings


class Condition(enum.StrEnum):
    ok = "ok"
    engine_fatal = "engine_fatal"
    storage_unavailable = "storage_unavailable"


@dataclass(frozen=True)
class HealthView:
    condition: Condition
    reason: str | None
    failures: int
    resumes_in_s: float

    @property
    def healthy(self) -> bool:
        return self.condition is Condition.ok


class WorkerHealth:
    """Thread-safe: the worker's loop trips and waits; presence and `/readyz` read `view()` from other threads."""

    def __init__(self, recovery: RecoverySettings) -> None:
        self.recovery = recovery
        self._lock = threading.Lock()
        self._condition = Condition.ok
        self._reason: str | None = None
        self._failures = 0
        self._until = 0.0
        self.jobs_done_at_trip = 0

    def trip(self, condition: Condition, reason: str, *, jobs_done: int = 0) -> float:
        """Record a failure of the worker; returns the pause (seconds) before it claims again. `jobs_done`: the
        worker's count now, so a later success tells the loop the failure is over."""
        base = (
            self.recovery.fatal_backoff_seconds
            if condition is Condition.engine_fatal
            else self.recovery.storage_backoff_seconds
        )
        with self._lock:
            self._failures += 1
            pause = min(self.recovery.max_backoff_seconds, base * 2.0 ** (self._failures - 1))
            self._condition, self._reason = condition, reason
            self._until = time.monotonic() + pause
            self.jobs_done_at_trip = jobs_done
        return pause

    def recovered(self) -> None:
        """A job went through: whatever was wrong is fixed."""
        with self._lock:
            self._condition, self._reason, self._failures, self._until = Condition.ok, None, 0, 0.0

    @property
    def healthy(self) -> bool:
        return self._condition is Condition.ok

    @property
    def condition(self) -> Condition:
        return self._condition

    def paused(self) -> bool:
        return time.monotonic() < self._until

    def wait(self, stop: threading.Event) -> None:
        """Sleep out the pause (or until `stop`)."""
        remaining = self._until - time.monotonic()
        if remaining > 0:
            stop.wait(remaining)

    def view(self) -> HealthView:
        with self._lock:
            return HealthView(self._condition, self._reason, self._failures, max(0.0, self._until - time.monotonic()))
