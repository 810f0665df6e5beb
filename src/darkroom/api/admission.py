"""How many requests this API process works on at once: a limit that follows latency (the edge's backpressure).

A fixed in-flight limit is either too low for a fast machine or too high for a slow one: measured with 200 clients
on 2 cores, 64 admitted requests shared one interpreter and a submit took 0.9 s at the median and 7 s at p99, every
one of them accepted. What a caller needs is an answer that is either quick or an immediate 429 with Retry-After.

So the limit moves (as TCP and adaptive concurrency limiters do): every `WINDOW_SECONDS`, if the window's 90th
percentile of the time admitted requests spent in this process exceeded the target, the limit shrinks in proportion
(limit × target / p90, by a tenth at least and by half at most; never below `floor`); if the limit was reached
while requests stayed under the target, it grows, by a quarter while they stay under half the target, else by one
(never above `ceiling`, the configured `max_in_flight`). It starts at 16 (`START`), not the ceiling: a burst that
meets a new process was otherwise admitted whole and waited out the first windows of shrinking (measured with 200
clients: the first second's p90 was 0.4 s, against 0.05 s afterwards, and it made the run's p99). The floor (4 by
default) is below the start: on a machine too slow to serve 16 requests at once within the target, a floor of 16
held the limit where the target could not be met (measured with 200 clients and a worker on a slow 2-core machine:
accepted submits p50 / p99 93-101 / 208-225 ms with a floor of 16, 37-43 / 125-141 ms with 4, and 5 % more of
them), at the price of an occasional 429 to 16 clients there (1 % of attempts). A percentile rather than
the median, because what a caller feels is the tail: with the median held at 100 ms, the p99 was 0.3-0.5 s.
Under overload the admitted requests are as many as the process can finish within the target, and the rest are
refused at once. The default target (`server.admission_target_ms`, 40 ms at the 90th percentile) is what keeps an
accepted submit's p99 under 100 ms as a client sees it (a server-side p99 is about 1.7 times its p90, and the client
adds its own): with 200 clients and a worker on a slow two-core machine (`bench/load.py`), 94-134 ms against
124-160 ms with a 60 ms target, for 3-5 % more accepted submits; API-only with 200 clients 60-67 ms against 84-100
ms. The price is paid where a machine cannot serve 16 clients within it: there 3 % of their attempts get a 429 and
8 % fewer submits are accepted (`bench/service_overhead.py --phases submit`). Requests whose own work is heavy (large
uploads decoded in the process) may want a higher target.

What is timed is the work, not the waiting: a request's time starts when its body has arrived (a slow upload is the
client's time), and a route that waits for a job (`/v1/generate`, the A1111 and OpenAI sync routes) leaves its slot
before it waits (`leave`), since waiting on the change feed costs nothing while nothing happens.

The store's own 429 (`queue_full`: the queue, or the tenant's share of it, at its limit) comes after the whole
submit: the body read and validated, a write transaction that finds the queue full. Measured with 200 clients on a
full tenant queue, those refusals took 45 ms at the median and 164 ms at p99 in the server, and held the write lock
that accepted submits wait for. `QueueFullMemo` remembers such a refusal for a moment (a second at most, never past
its Retry-After), so the next submits to that route, by that tenant (every tenant, when the whole queue is full),
are refused at the edge before their body is read: the route raises the same error, in its own API's shape and
with the same Retry-After, as it does an auth refusal the edge decided. A submit with an
Idempotency-Key is let through: it may be the replay of a job already queued, which answers without queueing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from darkroom import clock

WINDOW_SECONDS = 0.25
QUANTILE = 0.9  # of a window's times, the one held to the target
DECREASE = 0.9  # the least a slow window shrinks the limit by (× limit); by half at most
GROWTH = 0.25  # a window well under the target grows a reached limit by this share of it (else by one)
START = 16  # the limit a new process starts at (within floor and ceiling)


@dataclass
class InFlight:
    """Requests this process is handling now, and how many it admits. Touched only on the event loop's thread."""

    ceiling: int
    target_seconds: float = 0.04  # `server.admission_target_ms`
    floor: int = 4  # `server.admission_floor`
    count: int = 0
    limit: float = field(init=False)
    _samples: list[float] = field(default_factory=list)
    _window_started: float = field(default_factory=lambda: clock.monotonic())
    _reached: bool = False

    def __post_init__(self) -> None:
        self.floor = min(self.floor, self.ceiling)
        self.limit = float(min(max(START, self.floor), self.ceiling))

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
        ordered = sorted(self._samples)
        seen = ordered[min(len(ordered) - 1, int(QUANTILE * len(ordered)))]
        if seen > self.target_seconds:
            shrink = max(0.5, min(DECREASE, self.target_seconds / seen))
            self.limit = max(float(self.floor), self.limit * shrink)
        elif self._reached:
            grow = max(1.0, self.limit * GROWTH) if seen < self.target_seconds / 2 else 1.0
            self.limit = min(float(self.ceiling), self.limit + grow)
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


FULL_MEMO_SECONDS = 1.0  # the longest a queue_full refusal is repeated at the edge without asking the store again


@dataclass(frozen=True)
class Refusal:
    tenant: str | None
    message: str
    retry_after: int
    until: float


class QueueFullMemo:
    """Recent `queue_full` refusals by (tenant, path); the tenant None stands for the whole queue. Noted from request
    threads, read on the event loop."""

    def __init__(self, seconds: float = FULL_MEMO_SECONDS) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._refusals: dict[tuple[str | None, str], Refusal] = {}

    def note(self, tenant: str | None, path: str, message: str, retry_after: int) -> None:
        until = clock.monotonic() + min(self.seconds, float(retry_after))
        with self._lock:
            self._refusals[(tenant, path)] = Refusal(tenant, message, retry_after, until)

    def refusal(self, tenant: str, path: str) -> Refusal | None:
        """The refusal a submit by `tenant` to `path` would meet now, if one was seen within its time."""
        if not self._refusals:  # the common case: nothing full, no lock
            return None
        now = clock.monotonic()
        with self._lock:
            for key in ((None, path), (tenant, path)):
                found = self._refusals.get(key)
                if found is not None and found.until <= now:
                    del self._refusals[key]
                elif found is not None:
                    return found
        return None
