"""The worker loop: claim a batch → run each job → store → complete, with leases kept alive beside it.

A heartbeat thread extends the leases of every claimed job while the engine works and picks up cancel requests; the
engine's step callback turns those, a timeout or a drain deadline into an exception at the next denoising step.
Results are written only while we still hold the lease (the store guards every write), so a worker that stalled past
its lease can never double-complete a job.

Batching: the worker claims up to `max_batch` *compatible* jobs at once (same model, size, steps, sampler, guidance,
mode) and runs them back to back on the warm pipeline. Each image is denoised with its own generator, so a job's
pixels do not depend on what it was batched with.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from darkroom import __version__, clock
from darkroom.auth.tenants import TenantStore
from darkroom.config import Settings
from darkroom.engines import routing
from darkroom.engines.base import BatchItem, Engine, EngineResult
from darkroom.engines.controlnet import units_record as controlnet_units
from darkroom.engines.hires import passes as hires_passes
from darkroom.engines.refiner import passes as refiner_passes
from darkroom.engines.upscalers import run_upscale
from darkroom.errors import (
    DarkroomError,
    Draining,
    FatalEngineError,
    JobCancelled,
    JobTimeout,
    LeaseLost,
    StorageUnavailable,
)
from darkroom.jobs.notify import ChangeFeed
from darkroom.jobs.store import JobRecord, JobStore, LeaseAck, NewImage
from darkroom.jobs.workers import WorkerRegistry
from darkroom.kv import SettingsKV
from darkroom.models.approvals import approved
from darkroom.models.registry import ModelRegistry
from darkroom.models.verify import verify_local_models
from darkroom.observability import metrics, tracing
from darkroom.observability.cost import batch_share, device_cost
from darkroom.observability.logging import context as log_context
from darkroom.safety.checker import OutputChecker, load_checker, review_decision
from darkroom.safety.provenance import encode_png
from darkroom.schemas import GenerationRequest
from darkroom.storage.base import BlobStore
from darkroom.worker.failures import claim_gate, settle_fatal, settle_storage
from darkroom.worker.health import WorkerHealth
from darkroom.worker.lookahead import Lookahead
from darkroom.worker.presence import Presence, engine_batch_limits

log = logging.getLogger("darkroom.worker")

EngineFactory = Callable[[], Engine]


def default_worker_id(index: int = 0) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


class _Leases:
    """Keeps the leases of a claimed batch alive from a side thread and remembers what the store said of each job."""

    def __init__(self, store: JobStore, jobs: list[JobRecord], worker_id: str, settings: Settings) -> None:
        self.store, self.worker_id, self.settings = store, worker_id, settings
        self.pending = {job.id for job in jobs}
        self.lost: set[str] = set()
        self.cancelled: set[str] = set()
        self._handed: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"leases-{worker_id}", daemon=True)

    def start(self) -> _Leases:
        if self.pending:
            self._thread.start()
        return self

    def handed_off(self, job_id: str) -> None:
        """The job's images went to post-processing, which calls `done` once the job is written."""
        with self._lock:
            self._handed.add(job_id)

    def settle(self, job_id: str) -> None:
        """The device is through with the job: done, unless post-processing still holds it."""
        with self._lock:
            handed = job_id in self._handed
        if not handed:
            self.done(job_id)

    def abandon(self) -> None:
        """Stop renewing every job the device did not hand to post-processing, so their leases run out."""
        with self._lock:
            ids = self.pending - self._handed
        for job_id in ids:
            self.done(job_id)

    def done(self, job_id: str) -> None:
        """The job's outcome is written (or it is no longer ours): stop renewing its lease. The heartbeat thread
        ends with the batch's last job, which may be after the device moved on to the next batch."""
        with self._lock:
            self.pending.discard(job_id)
            if not self.pending:
                self._stop.set()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            with self._lock:
                ids = list(self.pending)
            for job_id in ids:
                try:
                    self.note(job_id, self.store.heartbeat(job_id, self.worker_id, self.settings.lease_seconds))
                except Exception:  # a database blip: keep trying until the lease runs out
                    log.exception("heartbeat failed for %s", job_id)

    def note(self, job_id: str, ack: LeaseAck) -> None:
        if not ack.owned:
            self.lost.add(job_id)
        if ack.cancel_requested:
            self.cancelled.add(job_id)

    def check(self, job_id: str) -> None:
        if job_id in self.lost:
            raise LeaseLost(f"lease on {job_id} was lost")
        if job_id in self.cancelled:
            raise JobCancelled("cancelled by request")


class _Run:
    """The step callback for one job: throttled progress writes, then every reason to stop at this step."""

    def __init__(self, worker: Worker, leases: _Leases, job: JobRecord) -> None:
        self.worker, self.leases, self.job = worker, leases, job
        self.started = time.monotonic()
        timeout = job.timeout_seconds or worker.settings.job_timeout_seconds
        self.deadline = self.started + timeout if timeout else None
        # The claim already said "running": a step is written once the job has run `progress_interval`, so a job
        # shorter than that costs no progress write at all (its completion says the rest).
        self._last_write = self.started
        self._last_preview = 0.0
        self._preview: str | None = None
        self.previews = bool(job.request.get("preview"))

    def wants_preview(self, step: int) -> bool:
        """Engine hook: previews only for jobs that asked, at most every `preview_every_seconds`."""
        return self.previews and time.monotonic() - self._last_preview >= self.worker.settings.preview_every_seconds

    def preview(self, step: int, jpeg: bytes) -> None:
        self._last_preview = time.monotonic()
        self._preview = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()

    def __call__(self, step: int, total: int) -> None:
        """The engine's progress callback (a callable object, so the engine can find `wants_preview`)."""
        settings, now = self.worker.settings, time.monotonic()
        due = now - self._last_write >= settings.progress_interval
        if due or self._preview:
            self._last_write = now
            preview, self._preview = self._preview, None
            store = self.worker.store
            ack = store.progress(self.job.id, self.worker.id, step, total, settings.lease_seconds, preview=preview)
            self.leases.note(self.job.id, ack)
        self.leases.check(self.job.id)
        if self.deadline is not None and now > self.deadline:
            raise JobTimeout(f"job ran longer than its limit of {self.deadline - self.started:g} s")
        if self.worker.drain_deadline is not None and now > self.worker.drain_deadline:
            raise Draining("worker is shutting down")
        if step >= total:  # denoised: the decode follows, while the next pass is prepared (worker/lookahead.py)
            self.worker.lookahead.last_step()


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        blobs: BlobStore,
        engine_factory: EngineFactory,
        worker_id: str | None = None,
        registry: ModelRegistry | None = None,
        feed: ChangeFeed | None = None,
        tenants: TenantStore | None = None,
        route: routing.Route | None = None,
    ) -> None:
        """`registry`: this node's models; with it the worker claims only models it holds in their approved
        version (see `darkroom.models.approvals`). Without it, it claims any job. `feed`: the process's change feed
        (`Services.feed`), which wakes the worker when work arrives; without one, `run` starts its own. `tenants`:
        the process's policy reader, whose cache the API process keeps current (`Services.tenants`). `route`: the
        routing state the process's workers on this engine share (circuit, concurrency; `engines.routing`)."""
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.engine_factory = engine_factory
        self.registry = registry
        self._servable: set[str] | None = None
        self._servable_checked = -1e9
        self.id = worker_id or settings.worker_id or default_worker_id()
        self._engine: Engine | None = None
        self.jobs_done = 0
        self.drain_deadline: float | None = None
        self._stop = threading.Event()
        self.feed = feed
        self._tenants = tenants or TenantStore(store.engine, cache_seconds=settings.server.auth_cache_seconds)
        self.route = route or routing.Route(settings)
        self._wake = threading.Event()  # set by the change feed whenever a job becomes claimable
        self._next_reap = 0.0
        self._busy = False  # the last step ran a batch: the device is in use
        self._drained = False  # the last claim left no ready job: claim again only after a notice
        self._solo = False  # after a device failure in a joint batch: one job at a time until one succeeds
        self._post_pool: ThreadPoolExecutor | None = None
        self._post_slots = threading.BoundedSemaphore(max(1, settings.postprocess_workers))
        self._in_flight: set[Future[None]] = set()
        self._in_flight_lock = threading.Lock()
        self.health = WorkerHealth(settings.recovery)  # device failures and storage outages pause the worker
        self._claimed_ns = (0, 0)  # when the last claim began and ended (time.time_ns), for the jobs' traces
        self._traces: dict[str, Any] = {}  # job id -> its `job` span's context, for post-processing (tracing on)
        self.lookahead = Lookahead(self)  # the next pass prepared (and batch claimed) while the current one decodes

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self.engine_factory()
        return self._engine

    @functools.cached_property
    def output_checker(self) -> OutputChecker | None:
        """Imported on first use, once per worker; a bad path fails the job rather than release unchecked images."""
        return load_checker(self.settings)

    def engine_name(self) -> str:
        """The engine's name for metrics and routing, without building it."""
        return self._engine.name if self._engine is not None else self.settings.engine

    def held_models(self) -> set[str]:
        """What the engine holds, once it is built (building it only to ask would load the device early)."""
        return set(self._engine.held_models()) if self._engine is not None else set()

    def run(self, stop: threading.Event | None = None) -> None:
        """Claim and run until `stop` (or `begin_drain`); then drain: finish the current job within
        `drain_seconds` or give it back, and give back every claimed job not yet started."""
        if stop is not None:
            self._stop = stop
        stop = self._stop
        presence = Presence(
            WorkerRegistry(self.store.engine),
            self.id,
            self.settings,
            loaded_models=self.held_models,
            jobs_done=lambda: self.jobs_done,
            models_available=lambda: self.servable_models() or (),
            draining=stop.is_set,
            health=self.health.view,
            batch_limits=lambda: engine_batch_limits(self._engine),  # the fleet view's batch limit per model and size
        )
        presence.start()
        with log_context(worker_id=self.id):  # every line of the worker's own thread names it
            self._serve(stop, presence)

    def _serve(self, stop: threading.Event, presence: Presence) -> None:
        log.info("worker %s started", self.id)
        self.lookahead.claims = True  # the loop runs what it claims ahead; `run_once`/`process_batch` would not
        try:
            self._preload()
            self._loop(stop)
        finally:
            self.lookahead.give_back()  # a batch claimed ahead goes back to the queue uncharged
            self.flush()  # drain: images already denoised are written before the worker goes
            if self._post_pool is not None:
                self._post_pool.shutdown(wait=True)
                self._post_pool = None
            presence.stop()
            if self._engine is not None:
                self._engine.close()
        log.info("worker %s stopped after %d jobs", self.id, self.jobs_done)

    def preload_list(self) -> list[str]:
        """`preload_models`, or else the registry's default model (what a request without `model` gets), so the
        first image after start does not pay the model load. `preload_default_model=False` turns the latter off."""
        if self.settings.preload_models:
            return list(self.settings.preload_models)
        if self.registry is None or not self.settings.preload_default_model:
            return []
        try:
            return [self.registry.default().id]
        except DarkroomError:  # no models yet: nothing to load
            return []

    def _preload(self) -> None:
        for model_id in self.preload_list():
            try:
                self.engine.preload(model_id)
                log.info("worker %s preloaded %s", self.id, model_id)
            except Exception:  # a missing model must not keep the worker from serving the others
                log.exception("worker %s could not preload %s", self.id, model_id)

    def _loop(self, stop: threading.Event) -> None:
        """Sleep on the change feed between batches. The fallback tick catches work that becomes due without an
        event (a retry's backoff ends, a lease expires) and runs the reaper."""
        s = self.settings
        feed = self.feed or ChangeFeed(self.store.url, self.store.engine, check_seconds=s.feed_check_seconds)
        stop_listening = feed.on_work(self._wake.set)
        try:
            self._claim_until(stop, min(s.idle_poll_seconds, s.lease_seconds / 2))
        finally:
            stop_listening()
            if feed is not self.feed:
                feed.close()

    def _claim_until(self, stop: threading.Event, idle: float) -> None:
        while not stop.is_set():
            try:
                if not claim_gate(self, stop):
                    continue
                if self._drained and not self._wake.is_set():
                    # The last claim emptied the queue and nothing was announced since: a claim now would only take
                    # the write lock from the post-processing of the batch that just ran. Wait for a notice.
                    self._busy = False
                    self._idle(idle)
                    continue
                if not self._step():
                    self._idle(idle)
            except FatalEngineError:
                log.exception("worker %s: engine is unusable; stopping", self.id)
                return
            except Exception:  # the database went away for a moment: back off, never die
                log.exception("worker %s: loop error", self.id)
                stop.wait(min(5.0, self.settings.poll_seconds * 4))

    def servable_models(self) -> set[str] | None:
        """Local models in their approved version, re-checked every `model_check_seconds` (hashes are cached)."""
        if self.registry is None:
            return None
        if time.monotonic() - self._servable_checked >= self.settings.model_check_seconds:
            self._servable = verify_local_models(self.registry, approved(SettingsKV(self.store.engine)))
            self._servable_checked = time.monotonic()
        return self._servable

    def begin_drain(self) -> None:
        """Called from a signal handler: stop claiming, and set the bound for the job that is running."""
        self.drain_deadline = time.monotonic() + self.settings.drain_seconds
        self._stop.set()
        self._wake.set()

    def run_once(self) -> bool:
        """Claim and run one batch, and wait until its jobs are written. False when there was nothing to do."""
        worked = self._step()
        self.flush()
        return worked

    def _step(self) -> bool:
        """Claim and denoise one batch; its post-processing may still run when this returns (see `flush`)."""
        self._reap()
        if not self.route.take(self.store):  # routing: an open circuit, no overflow yet, or no free slot
            return False
        try:
            batch = self.lookahead.claimed() or self.claim(busy=self._busy)
            self._busy = bool(batch)
            if batch:
                self._run_batch(batch)
        finally:
            self.route.give()
        return self._busy

    def _idle(self, timeout: float) -> None:
        """Nothing to claim: sleep until the feed says a job is claimable (or the fallback tick)."""
        self._wake.wait(timeout)
        self._drained = False  # a notice, or the fallback tick: a retry's backoff may have ended

    def _reap(self) -> None:
        """Requeue jobs of dead workers, at most every `lease_seconds / 2`: it is a write transaction, and a lease
        cannot expire much faster than that."""
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + self.settings.lease_seconds / 2
            self.store.requeue_expired()

    def claim(self, busy: bool = False, start_head: bool = True) -> list[JobRecord]:
        """The next batch. Only a worker that comes straight from a batch (`busy`) waits up to
        `batch_window_seconds` to fill a partial one; an idle worker starts a lone job at once, and jobs that queued
        while the device was busy are claimed together anyway. `start_head`: the claim also starts the head job."""
        s = self.settings
        began = time.time_ns()
        labels = self._labels()  # an external engine never takes confidential work (engines.routing)
        self._wake.clear()  # a notice from here on may be for a job this claim does not see
        claimed = self.store.claim_next(
            self.id,
            s.lease_seconds,
            max_batch=s.max_batch,
            held_models=self.held_models(),
            servable_models=self.servable_models(),
            labels=labels,
            start_head=start_head,  # the head runs next: its claim starts it (no separate `start` transaction)
        )
        batch, self._drained = claimed.jobs, claimed.drained
        self._claimed_ns = (began, time.time_ns())  # each job's trace gets a `claim` span (`_start`)
        deadline = time.monotonic() + (s.batch_window_seconds if busy else 0.0)
        while batch and len(batch) < s.max_batch and time.monotonic() < deadline:
            time.sleep(min(0.02, s.batch_window_seconds))
            batch += self.store.claim_batch(
                self.id,
                s.lease_seconds,
                max_batch=s.max_batch - len(batch),
                batch_key=batch[0].batch_key,
                labels=labels,
            )
        return batch

    def claim_ahead(self) -> list[JobRecord]:
        """The look-ahead's claim of the next batch while the current one decodes (worker/lookahead.py): its head
        starts when it runs, and the loop runs it next without waiting for a notice. None while stopping or paused."""
        if self._stop.is_set() or self.health.paused():
            return []
        if self._drained and not self._wake.is_set():  # the last claim emptied the queue and nothing came since
            return []
        batch = self.claim(start_head=False)
        self._drained = self._drained and not batch
        return batch

    def _labels(self) -> list[str] | None:
        """The data labels this worker's engine may take: any for the local device (not built to ask)."""
        return self.route.labels(routing.is_remote(self.settings) and self.engine.capabilities.external)

    def process(self, job: JobRecord) -> None:
        self.process_batch([job])

    def process_batch(self, batch: list[JobRecord]) -> None:
        """Run a claimed batch and wait until every job of it is written."""
        self._run_batch(batch)
        self.flush()

    def _run_batch(self, batch: list[JobRecord]) -> None:
        """Denoise the batch: as one tensor batch when the engine can (`generate_batch`), else job after job; each
        job's images go to post-processing while the device moves on. Leases stay renewed until each job's outcome
        is written."""
        leases = _Leases(self.store, batch, self.id, self.settings).start()
        metrics.batch_claimed(len(batch))
        try:
            requests = self._together(batch)
            if requests is not None:
                self._run_together(batch, requests, leases)
                return
            for index, job in enumerate(batch):
                self.lookahead.hold(batch[index + 1 :])  # prepared while this one decodes
                try:
                    if self._stop.is_set() or self.health.paused() or self.route.tripped():
                        self.store.release(job.id, self.id)
                        continue
                    self._process(job, leases)
                finally:
                    leases.settle(job.id)
        finally:
            self.lookahead.batch_done(batch)
            leases.abandon()  # an error cut the batch short: its unstarted jobs go back through the reaper

    def _together(self, batch: list[JobRecord]) -> list[GenerationRequest] | None:
        """The batch's requests when the engine runs them as one tensor batch (see `BatchingEngine`), else None."""
        batchable = getattr(self.engine, "batchable", None)
        if len(batch) < 2 or self._solo or batchable is None:
            return None
        requests = [job.generation_request() for job in batch]
        return requests if batchable(requests) else None

    def _run_together(self, batch: list[JobRecord], requests: list[GenerationRequest], leases: _Leases) -> None:
        """Start every job of the batch, hand their requests to the engine as one batch, and settle each job from
        its own outcome, so a cancelled or failing job ends alone. A device failure ends them all: the first is
        charged as usual (`settle_fatal`, which also counts toward poison), the others go back uncharged, and the
        worker runs one job at a time until a job succeeds again, so a job that breaks the device is found alone."""
        started: list[tuple[JobRecord, _Run]] = []
        items: list[BatchItem] = []
        for job, request in zip(batch, requests, strict=True):
            if self._stop.is_set() or self.health.paused():
                self.store.release(job.id, self.id)
                leases.settle(job.id)
                continue
            begun = self._start(job, leases)
            if begun is None:
                leases.settle(job.id)
                continue
            job, run = begun
            try:
                item = self._batch_item(job, run, request)
            except Exception as exc:
                self._settle(job, functools.partial(_raise, exc))
                leases.settle(job.id)
                continue
            started.append((job, run))
            items.append(item)
        if not items:
            return
        log.info("worker %s runs %d jobs as one batch: %s", self.id, len(items), " ".join(j.id for j, _ in started))
        with contextlib.ExitStack() as spans:  # each job's `job` span, in its own request's trace (tracing on)
            contexts = [self._job_span(spans, job, batch_size=len(items)) for job, _ in started]
            began = time.time_ns()
            try:
                outcomes = self.engine.generate_batch(items)  # type: ignore[attr-defined]
            except FatalEngineError as exc:
                (first, _), rest = started[0], started[1:]
                self._settle(first, functools.partial(_raise, exc))
                for job, _ in rest:
                    self.store.release(job.id, self.id, reason="a batch partner's run failed the device")
                self._solo = True
                for job, _ in started:
                    leases.settle(job.id)
                return
            ended = time.time_ns()
            for (job, run), outcome, context in zip(started, outcomes, contexts, strict=True):
                tracing.record("denoise", began, ended, context, batch_size=len(items))  # the one pass they shared
                if context is not None:
                    self._traces[job.id] = context
                try:
                    if isinstance(outcome, Exception):
                        self._settle(job, functools.partial(_raise, outcome))
                    else:
                        self._settle(job, functools.partial(self._hand_off, job, outcome, run.started, leases))
                finally:
                    leases.settle(job.id)

    def _job_span(self, spans: contextlib.ExitStack, job: JobRecord, **attrs: Any) -> Any:
        """Open `job`'s span on `spans` (closed when the batch is handed off) and return its context."""
        attrs |= {"job_id": job.id, "tenant": job.tenant, "model": job.model, "worker": self.id}
        return tracing.context_of(
            spans.enter_context(tracing.span("job", tracing.request_context(job.request_id), **attrs))
        )

    def _batch_item(self, job: JobRecord, run: _Run, request: GenerationRequest | None = None) -> BatchItem:
        """What the engine needs of a job: its request (parsed here unless given) and source images (the mask, for
        inpainting, is read as grey by the engine). Raises if the lease was lost or a cancel came first."""
        run.leases.check(job.id)
        request = request or job.generation_request()
        init = self._load_image(request.init_image)
        mask = self._load_image(request.mask_image)
        controls = [self._load_image(unit.image) for unit in request.controlnet] or None  # ControlNet units' images
        item = BatchItem(request=request, progress=run, init_image=init, mask_image=mask, control_images=controls)
        item.prepared = self.lookahead.prepared(job.id)  # its prompts encoded while the previous pass decoded
        return item

    def _start(self, job: JobRecord, leases: _Leases) -> tuple[JobRecord, _Run] | None:
        """Charge the attempt (it counts from the start, not from the claim; the head of a claim was started by the
        claim itself) and set up the job's step callback; None when the lease was lost before it started."""
        if job.started_at is None:  # the head of a claim was started by the claim itself
            attempt = self.store.start(job.id, self.id)
            if attempt is None:
                log.warning("worker %s lost the lease on %s before it started", self.id, job.id)
                return None
            job = dataclasses.replace(job, attempts=attempt, started_at=clock.utcnow())  # as `start` wrote it, ±ms
        if self._claimed_ns[0]:
            tracing.record("claim", *self._claimed_ns, tracing.request_context(job.request_id), worker=self.id)
        return job, _Run(self, leases, job)

    def _process(self, job: JobRecord, leases: _Leases) -> None:
        with self._log_context(job):
            begun = self._start(job, leases)
            if begun is None:
                return
            job, run = begun
            log.info("worker %s runs %s (attempt %d)", self.id, job.id, job.attempts)
            self._settle(job, functools.partial(self._denoise, job, leases, run))

    def _log_context(self, job: JobRecord) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """The job's ids on every log line about it, on the device thread and the post-processing pool alike: the
        request id the API stored with the job carries a request's trail into its worker."""
        return log_context(worker_id=self.id, job_id=job.id, tenant=job.tenant, request_id=job.request_id)

    def _denoise(self, job: JobRecord, leases: _Leases, run: _Run) -> None:
        """Device thread: the engine's part of the job. The images then go to post-processing (`_hand_off`)."""
        attrs = {"job_id": job.id, "tenant": job.tenant, "model": job.model, "worker": self.id}
        with tracing.span("job", tracing.request_context(job.request_id), **attrs) as job_span:
            context = tracing.context_of(job_span)
            began = time.time_ns()
            with tracing.span("denoise"):
                result = self._generate(job, run)
            if load_s := float(result.timings.get("load_s") or 0.0):
                tracing.record("load", began, began + int(load_s * 1e9), context)
            if context is not None:
                self._traces[job.id] = context  # post-processing's spans go under this job's (`_finish` takes it)
            self._hand_off(job, result, run.started, leases)

    def _generate(self, job: JobRecord, run: _Run) -> EngineResult:
        item = self._batch_item(job, run)
        engine = self.engine
        if item.request.mode == "upscale" and "upscale" in engine.capabilities.modes:
            # no diffusion pipeline: engines/upscalers.py on the engine's device (an engine without the mode refuses)
            registry = self.registry or ModelRegistry.for_settings(self.settings)
            result = run_upscale(item.request, item.init_image, registry, engine.device, run)
        else:
            extra: dict[str, Any] = {"mask_image": item.mask_image} if item.mask_image is not None else {}
            if item.control_images:
                extra["control_images"] = item.control_images
            if item.prepared is not None:
                extra["prepared"] = item.prepared
            result = engine.generate(item.request, item.init_image, run, **extra)
        return result

    def _settle(self, job: JobRecord, work: Callable[[], None]) -> None:
        """Run `work` for `job` and turn what it raises into the job's next state. The device thread and the
        post-processing pool both go through here, so a failure ends a job the same way wherever it happens."""
        with self._log_context(job):
            self._settle_in_context(job, work)

    def _settle_in_context(self, job: JobRecord, work: Callable[[], None]) -> None:
        try:
            work()
        except JobCancelled:
            self.store.finish_cancelled(job.id, self.id)
        except LeaseLost:
            log.warning("worker %s lost the lease on %s; dropping its work", self.id, job.id)
        except Draining:
            log.info("worker %s gives %s back to the queue (draining)", self.id, job.id)
            self.store.release(job.id, self.id)
        except FatalEngineError as exc:  # the device's fault: released uncharged, the worker pauses
            self.route.failed(self.engine_name())
            settle_fatal(self, job, exc)
        except StorageUnavailable as exc:  # the blob store's fault: released uncharged, the worker pauses for minutes
            settle_storage(self, job, exc)
        except DarkroomError as exc:
            permanent = getattr(exc, "permanent", True)
            if not permanent:
                self.route.failed(self.engine_name())
            self.store.fail(job.id, self.id, exc.to_dict(), retry_in=None if permanent else self._backoff(job))
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job.id)
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "field": None}
            self.store.fail(job.id, self.id, error, retry_in=self._backoff(job))

    def _hand_off(self, job: JobRecord, result: EngineResult, started: float, leases: _Leases) -> None:
        """Give the images to the post-processing pool and return to the device. A full pool makes the device
        thread wait here (backpressure: images never pile up in memory). With `postprocess_workers=0` the work
        runs inline."""
        if self.settings.postprocess_workers <= 0:
            self._finish(job, result, started)
            return
        self._post_slots.acquire()
        try:
            if self._post_pool is None:
                self._post_pool = ThreadPoolExecutor(self.settings.postprocess_workers, f"post-{self.id}")
            leases.handed_off(job.id)
            future = self._post_pool.submit(self._post, job, result, started, leases)
        except BaseException:
            self._post_slots.release()
            raise
        with self._in_flight_lock:
            self._in_flight.add(future)
        future.add_done_callback(self._post_done)

    def _post(self, job: JobRecord, result: EngineResult, started: float, leases: _Leases) -> None:
        """Pool thread: safety check, watermark, C2PA, PNG, upload and completion. Never touches the engine."""
        try:
            self._settle(job, functools.partial(self._finish, job, result, started))
        finally:
            leases.done(job.id)
            self._post_slots.release()

    def _post_done(self, future: Future[None]) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.error("worker %s: post-processing raised %s", self.id, exc, exc_info=exc)

    def flush(self) -> None:
        """Wait until every job handed to post-processing is written."""
        while True:
            with self._in_flight_lock:
                pending = list(self._in_flight)
            if not pending:
                return
            wait(pending)  # failures are logged by `_post_done`

    def _backoff(self, job: JobRecord) -> float:
        """Exponential: base, 2·base, 4·base … capped at a minute."""
        return min(60.0, self.settings.retry_backoff_seconds * 2.0 ** max(0, job.attempts - 1))

    def _load_image(self, ref: str | None) -> Any:
        if not ref:
            return None
        from PIL import Image

        key = ref.removeprefix("blob:")
        image = Image.open(io.BytesIO(self.blobs.get(key)))
        return image.convert("RGB")

    def _finish(self, job: JobRecord, result: EngineResult, started: float) -> None:
        request = job.request
        timings = {**result.timings, "worker_total_s": round(clock.monotonic() - started, 4)}
        if job.started_at:
            timings["queue_wait_s"] = round((job.started_at - job.created_at).total_seconds(), 4)
        common: dict[str, Any] = {
            "job_id": job.id,
            "request_id": job.request_id,
            "request": request,
            "model": result.model.model_dump(include={"id", "name", "sha256", "format", "arch", "smoke_test"}),
            "engine": result.engine,
            "scheduler": result.scheduler,
            "device": result.device,
            "dtype": result.dtype,
            "versions": {"darkroom": __version__, **result.versions},
            "timings": timings,
            "worker": self.id,
        }
        if result.remote:
            common["remote"] = result.remote  # which other darkroom computed the pixels, and its job
        if request.get("hires"):
            common["hires_passes"] = hires_passes(request)  # both passes: sizes, steps, the upscaler between
        if request.get("controlnet"):  # each unit: model and hash, module, weight, range, control image sha256
            common["controlnet"] = controlnet_units(request)
        if request.get("refiner"):
            common["refiner_passes"] = refiner_passes(request, result.model.sha256)  # which model ran which steps
        policy = self._tenants.get(job.tenant)  # cached for `server.auth_cache_seconds`, like the API's reads
        new_images = []
        trace = self._traces.pop(job.id, None) or tracing.request_context(job.request_id)
        for index, item in enumerate(result.images):
            with tracing.span("encode", trace, image_index=index):
                png = encode_png(
                    item.image,
                    {**common, "seed": item.seed, "image_index": index},
                    watermark=self.settings.security.watermark,
                    c2pa_dir=self.settings.data_dir / "c2pa" if self.settings.security.c2pa else None,
                    compress_level=self.settings.storage.png_compress_level,
                )
            with tracing.span("store", trace, image_index=index):
                digest, key = self.blobs.put(png, "image/png")
            review_state, review_reason = review_decision(self.output_checker, policy, item.image, request, job.tenant)
            new_images.append(
                NewImage(
                    index=index,
                    seed=item.seed,
                    width=item.image.width,
                    height=item.image.height,
                    sha256=digest,
                    blob_key=key,
                    content_type="image/png",
                    size_bytes=len(png),
                    review_state=review_state,
                    review_reason=review_reason,
                )
            )
        seeds = [i.seed for i in result.images]
        share = batch_share(result.timings, len(result.images))
        cost = device_cost(self.settings, result.device, timings["worker_total_s"] * share)
        cost = routing.billed(self.settings, len(result.images), cost)  # a cloud's per-image price instead
        with tracing.span("store", trace, job_id=job.id):
            completed = self.store.complete(job.id, self.id, new_images, {**common, "seeds": seeds}, cost=cost)
        if completed:
            self.route.succeeded(result.engine, timings["worker_total_s"])
            with self._in_flight_lock:  # post-processing threads finish jobs concurrently
                self.jobs_done += 1
            self._solo = False
            _measured(self.id, job, result, timings["worker_total_s"])
        else:
            log.warning("worker %s finished %s but no longer owns it; result dropped", self.id, job.id)


def _measured(worker_id: str, job: JobRecord, result: EngineResult, seconds: float) -> None:
    """A succeeded job's metrics. Steps per second counts every image the tensor batch denoised together."""
    request = job.generation_request()
    inference = float(result.timings.get("inference_s") or 0.0)
    images_run = int(result.timings.get("batch_images") or len(result.images))
    rate = request.steps * images_run / inference if inference > 0 else None
    metrics.job_succeeded(
        worker=worker_id,
        tenant=job.tenant,
        model=job.model or "default",
        mode=request.mode,
        seconds=seconds,
        images=len(result.images),
        steps_per_second=rate,
    )


def _raise(exc: BaseException) -> None:
    """`_settle` takes work to run; an outcome that is already an exception is settled by raising it there."""
    raise exc
