"""Routing policy: which engine's workers may take which jobs, and when a remote engine takes any at all.

Each worker runs one engine and claims jobs from the one queue, so routing is applied where jobs are claimed:
- **data label** (`confidential`, `internal`, `public`): a job's label is the stricter of its request's and its
  tenant's (`TenantPolicy.data_label`), else `routing.default_label`. A worker whose engine is external (the work
  leaves this deployment: another operator's server, a cloud API) claims only jobs whose label is in
  `routing.external_labels`, and never `confidential` ones: the claim statement itself filters on the stored label
  (`JobStore.claim_batch(labels=…)`), so no submit path or stale worker can send confidential work out.
- **overflow**: a remote engine's worker may be told to claim only while the local backlog is long
  (`routing.overflow_queue_depth` queued jobs, or the next job waiting `routing.overflow_wait_seconds`), so owned GPUs
  take the work first and the remote pool absorbs peaks.
- **circuit breaking and concurrency**: `routing.circuit_failures` failed runs in a row open an engine's circuit, and
  its workers claim nothing for `routing.circuit_cooldown_seconds`; the jobs they gave back are retried by whichever
  engine's worker claims them next (their attempts and errors stay on the job). `routing.max_concurrency` bounds the
  jobs a process's workers run on their engine at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from darkroom.observability import metrics

if TYPE_CHECKING:
    from darkroom.config import RoutingSettings, Settings
    from darkroom.jobs.store import JobStore

log = logging.getLogger("darkroom.routing")
STRICTNESS: dict[str, int] = {"public": 0, "internal": 1, "confidential": 2}


def job_label(requested: str | None, tenant: str | None, default: str) -> str:
    """The stricter of the request's and the tenant's label; the default when neither says."""
    given = [label for label in (requested, tenant) if label]
    return max(given, key=STRICTNESS.__getitem__) if given else default


def claimable_labels(external: bool, routing: RoutingSettings) -> list[str] | None:
    """The labels a worker may claim: None (any) for an engine inside the deployment."""
    if not external:
        return None
    return [label for label in routing.external_labels if label != "confidential"]


def is_remote(settings: Settings) -> bool:
    return settings.engine != "diffusers"


def billed(settings: Settings, images: int, device_cost: float) -> float:
    """A job's cost as the usage report sums it per tenant: a remote with a per-image price (a cloud API) bills its
    images at `remote.price_per_image`; otherwise the device time at its class's price (observability.cost)."""
    price = settings.remote.price_per_image
    if is_remote(settings) and price is not None:
        return round(images * price, 8)
    return device_cost


def overflowing(store: JobStore, routing: RoutingSettings) -> bool:
    """Whether the local backlog is long enough for a remote engine's worker to claim (always, with no rule set)."""
    depth, wait = routing.overflow_queue_depth, routing.overflow_wait_seconds
    if depth is None and wait is None:
        return True
    queued, head_wait = store.backlog()
    return (depth is not None and queued >= depth) or (wait is not None and head_wait >= wait)


class Circuit:
    """An engine's circuit breaker, shared by a process's workers on that engine. Thread-safe."""

    def __init__(self, failures: int, cooldown_seconds: float) -> None:
        self.threshold, self.cooldown = failures, cooldown_seconds
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0

    def allows(self) -> bool:
        """False while open. After the cool-down the circuit lets work through again (half-open): the next failure
        opens it at once, a success closes it."""
        with self._lock:
            return time.monotonic() >= self._open_until

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0

    def failed(self) -> bool:
        """Count a failed run; True when this failure opened the circuit."""
        with self._lock:
            self._failures += 1
            if self._failures < self.threshold:
                return False
            self._open_until = time.monotonic() + self.cooldown
            self._failures = self.threshold - 1  # half-open after the cool-down: one more failure reopens it
            return True

    def state(self) -> str:
        return "closed" if self.allows() else "open"


class Slots:
    """At most `limit` jobs at once on an engine across a process's workers (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self._sem = threading.BoundedSemaphore(limit) if limit else None

    def take(self) -> bool:
        return self._sem.acquire(blocking=False) if self._sem is not None else True

    def give(self) -> None:
        if self._sem is not None:
            self._sem.release()


class Route:
    """A process's routing state for its engine: the circuit and the concurrency slots its workers share, and the
    rules each claim applies."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        rules = settings.routing
        self.circuit = Circuit(rules.circuit_failures, rules.circuit_cooldown_seconds)
        self.slots = Slots(rules.max_concurrency)
        # The local device has its own breaker (worker/health.py: device failures pause the worker); the circuit and
        # the overflow rule are for remote engines.
        self.remote = is_remote(settings)

    def take(self, store: JobStore) -> bool:
        """Whether a worker may claim now; True takes a concurrency slot, which `give` returns after the batch."""
        if self.remote and (not self.circuit.allows() or not overflowing(store, self.settings.routing)):
            return False
        return self.slots.take()

    def give(self) -> None:
        self.slots.give()

    def tripped(self) -> bool:
        """The circuit opened: the rest of a claimed batch goes back to the queue for other engines, uncharged."""
        return self.remote and not self.circuit.allows()

    def labels(self, external: bool) -> list[str] | None:
        return claimable_labels(external, self.settings.routing)

    def succeeded(self, engine: str, seconds: float) -> None:
        if self.remote:
            self.circuit.succeeded()
        metrics.engine_run(engine, "succeeded", seconds)

    def failed(self, engine: str) -> None:
        """A run that failed for a reason other than the request (a permanent refusal is the request's, not the
        engine's; a cancel is nobody's): counts toward opening the circuit."""
        if self.remote and self.circuit.failed():
            log.warning(
                "engine %s failed %d times in a row: its circuit is open for %.0f s",
                engine,
                self.circuit.threshold,
                self.circuit.cooldown,
            )
        metrics.engine_run(engine, "failed", None)
