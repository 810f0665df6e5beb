"""The worker's look-ahead: what the device runs next is prepared while the current batch decodes.

A pass starts by encoding its prompts and drawing its first latents, small serial steps the device would otherwise
wait for. When a job of the current batch has done its last denoising step (its progress callback says so; the VAE
decode and the copy to the host follow), the look-ahead has the engine prepare what comes next (`engine.prepare`,
engines/prepare.py), on a thread of its own:

- the next job of the current claim, when the claim runs job after job (the worker says which with `hold`);
- otherwise, in the worker's loop (`Worker.run`), the next batch, which it claims now, without starting its head
  job (the attempt counts from when it runs), and which the loop runs next (`claimed`) instead of claiming again.

Claiming ahead happens only at the last step and only while no other worker thread of the engine waits for the
device (it would run first), so a job claimed ahead waits about one decode, not one batch, and never behind a queue
of this worker's own making; nor after a claim that emptied the queue, until a notice says work came
(`Worker.claim_ahead`). The device thread waits for the look-ahead at the end of each batch (`batch_done`; it is
done by then, as a claim and a text encoding are shorter than a decode), so the loop always knows whether a batch is
waiting. A worker that stops gives a batch claimed ahead back uncharged (`give_back`). With `gpu.prepare_ahead`
off, or an engine without `prepare` (remote engines), nothing is prepared or claimed ahead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from darkroom.jobs.store import JobRecord
    from darkroom.worker.loop import Worker

log = logging.getLogger("darkroom.worker")


class Lookahead:
    """One worker's look-ahead; every method but the thread's own runs on the worker's device thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.enabled = worker.settings.gpu.prepare_ahead
        self.claims = False  # set by the worker's loop, which runs a batch claimed ahead (`claimed`) next
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future[None] | None = None
        self._held: list[JobRecord] = []  # the current claim's jobs still to run, in order (job after job)
        self._claimed: list[JobRecord] = []  # the next batch, claimed ahead
        self._prepared: dict[str, Any] = {}  # job id → the engine's preparation of its request
        self._looked = False  # the current job (or joint batch) has started its look-ahead already

    def hold(self, jobs: list[JobRecord]) -> None:
        """Device thread: the jobs of the current claim that run after the current one (none in a joint batch)."""
        with self._lock:
            self._held = list(jobs)
            self._looked = False

    def last_step(self) -> None:
        """Device thread (a job's progress callback): the job has done its last denoising step."""
        if not self.enabled or getattr(self.worker.engine, "prepare", None) is None:
            return
        with self._lock:
            if self._looked or self._claimed:
                return
            self._looked = True
            following = self._held[0] if self._held else None
            if (following is not None and following.id in self._prepared) or (following is None and not self.claims):
                return
            work: Callable[[], None] = self._claim if following is None else lambda: self._prepare([following])
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, f"lookahead-{self.worker.id}")
            self._future = self._pool.submit(self._guarded, work)

    def prepared(self, job_id: str) -> Any:
        """The preparation made for `job_id`, handed over once (None when none was made)."""
        with self._lock:
            return self._prepared.pop(job_id, None)

    def claimed(self) -> list[JobRecord]:
        """Device thread: the batch claimed ahead, to run now (empty when none)."""
        self.settle()
        with self._lock:
            batch, self._claimed = self._claimed, []
        return batch

    def settle(self) -> None:
        """Wait for the look-ahead's work in flight."""
        future = self._future
        if future is not None:
            future.result()

    def batch_done(self, batch: list[JobRecord]) -> None:
        """Device thread, at the end of a batch: wait for the look-ahead (so the loop knows whether a batch was
        claimed ahead), and drop what was prepared for the batch's jobs that did not run (cancelled, lease lost)."""
        self.settle()
        with self._lock:
            self._held = []
            self._looked = False
            for job in batch:
                self._prepared.pop(job.id, None)

    def give_back(self) -> None:
        """The worker stops: release the batch claimed ahead (never started, so uncharged) and forget the rest."""
        for job in self.claimed():  # (claimed() waits for the look-ahead's work first)
            self.worker.store.release(job.id, self.worker.id, reason="claimed ahead by a worker that stopped")
        with self._lock:
            self._prepared.clear()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # --- the look-ahead's thread ------------------------------------------------------------------------------------

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:  # a database blip or an engine error: the batch runs unprepared, or is claimed as usual
            log.warning("worker %s: looking ahead failed", self.worker.id, exc_info=True)

    def _claim(self) -> None:
        engine: Any = self.worker.engine
        if getattr(engine, "prepare", None) is None or getattr(engine, "waiting", lambda: 0)() > 0:
            return
        batch = self.worker.claim_ahead()
        with self._lock:
            self._claimed = batch
        if batch:
            self._prepare(batch)

    def _prepare(self, jobs: list[JobRecord]) -> None:
        prepare = getattr(self.worker.engine, "prepare", None)
        if prepare is None:
            return
        prepared = prepare([job.generation_request() for job in jobs])
        with self._lock:
            for job, made in zip(jobs, prepared, strict=True):
                if made is not None:
                    self._prepared[job.id] = made
