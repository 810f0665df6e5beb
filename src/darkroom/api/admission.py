"""How many requests this API process works on at once: a limit that follows latency (the edge's backpressure).

A fixed in-flight limit is either too low for a fast machine or too high for a slow one: measured with 200 clients
on 2 cores, 64 admitted requests shared one interpreter and a submit took 0.9 s at the median and 7 s at p99, every
one of them accepted. What a caller needs is an answer that is either quick or an immediate 429 with Retry-After.

So the limit moves (additive increase, multiplicative decrease, as TCP and adaptive concurrency limiters do):
every `WINDOW_SECONDS`, if the median time admitted requests spent in this process exceeded the target, the limit
shrinks by a tenth (never below `floor`); if the limit was reached while requests stayed under the target, it grows
by one (never above `ceiling`, the configured `max_in_flight`). Under overload the admitted requests are as many as
the process can finish within the target, and the rest are refused at once.

What is timed is the work, not the waiting: a request's time starts when its body has arrived (a slow upload is the
client's time), and a route that waits for a job (`/v1/generate`, the A1111 and OpenAI sync routes) leaves its slot
before it waits (`leave`), since waiting on the change feed costs nothing while nothing happens.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from darkroom import clock

WINDOW_SECONDS = 0.25
DECREASE = 0.9


@dataclass
class InFlight:
    """Requests this process is handling now, and how many it admits. Touched only on the event loop's thread."""

    ceiling: int
    target_seconds: float = 0.1
    floor: int = 16
    count: int = 0
    limit: float = field(init=False)
    _samples: list[float] = field(default_factory=list)
    _window_started: float = field(default_factory=lambda: clock.monotonic())
    _reached: bool = False

    def __post_init__(self) -> None:
        self.floor = min(self.floor, self.ceiling)
        self.limit = float(self.ceiling)

    @property
    def admitted(self) -> int:
        return int(self.limit)

    def full(self) -> bool:
        if self.count >= int(self.limit):
            self._reached = True
            return True
        return False

    def enter(self) -> Slot:
        self.count += 1
        if self.count >= int(self.limit):
            self._reached = True
        return Slot(self, clock.monotonic())

    def observe(self, seconds: float) -> None:
        now = clock.monotonic()
        self._samples.append(seconds)
        if now - self._window_started < WINDOW_SECONDS:
            return
        if statistics.median(self._samples) > self.target_seconds:
            self.limit = max(float(self.floor), self.limit * DECREASE)
        elif self._reached:
            self.limit = min(float(self.ceiling), self.limit + 1)
        self._samples.clear()
        self._window_started, self._reached = now, False


@dataclass
class Slot:
    """One admitted request's place. `leave` frees it (once) and reports the request's time."""

    limiter: InFlight
    started: float
    left: bool = False

    def work_starts(self) -> None:
        """The body has arrived: what came before was the client's time."""
        self.started = clock.monotonic()

    def leave(self) -> None:
        if self.left:
            return
        self.left = True
        self.limiter.count -= 1
        self.limiter.observe(clock.monotonic() - self.started)
