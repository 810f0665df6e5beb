"""The worker loop: claim → run → store → complete, with a lease kept alive beside it.

A heartbeat thread extends the lease while the engine works and picks up cancel requests; the engine's step callback
turns those into `JobCancelled` / `LeaseLost` at the next denoising step. Results are written only while we still hold
the lease (the store guards every write), so a worker that stalled past its lease can never double-complete a job.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from darkroom import __version__, clock
from darkroom.config import Settings
from darkroom.engines.base import Engine, EngineResult
from darkroom.errors import DarkroomError, EngineError, FatalEngineError, JobCancelled, LeaseLost
from darkroom.jobs.store import JobRecord, JobStore, NewImage
from darkroom.safety.provenance import encode_png
from darkroom.storage.base import BlobStore

log = logging.getLogger("darkroom.worker")

EngineFactory = Callable[[], Engine]


def default_worker_id(index: int = 0) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


class _Lease:
    """Keeps one job's lease alive from a side thread and remembers what the store told it."""

    def __init__(self, store: JobStore, job_id: str, worker_id: str, settings: Settings) -> None:
        self.store, self.job_id, self.worker_id, self.settings = store, job_id, worker_id, settings
        self.lost = threading.Event()
        self.cancel = threading.Event()
        self._stop = threading.Event()
        self._last_progress = 0.0
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.heartbeat_seconds + 5)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self._note(self.store.heartbeat(self.job_id, self.worker_id, self.settings.lease_seconds))
            except Exception:  # a database blip: keep trying until the lease runs out
                log.exception("heartbeat failed for %s", self.job_id)

    def _note(self, ack: Any) -> None:
        if not ack.owned:
            self.lost.set()
        if ack.cancel_requested:
            self.cancel.set()

    def progress(self, step: int, total: int) -> None:
        """Engine step callback: report (throttled) and stop the run if the job was cancelled or taken from us."""
        now = time.monotonic()
        if step in (1, total) or now - self._last_progress >= self.settings.progress_interval:
            self._last_progress = now
            self._note(self.store.progress(self.job_id, self.worker_id, step, total, self.settings.lease_seconds))
        if self.lost.is_set():
            raise LeaseLost(f"lease on {self.job_id} was lost")
        if self.cancel.is_set():
            raise JobCancelled("cancelled by request")


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        blobs: BlobStore,
        engine_factory: EngineFactory,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.engine_factory = engine_factory
        self.id = worker_id or settings.worker_id or default_worker_id()
        self._engine: Engine | None = None
        self.jobs_done = 0

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self.engine_factory()
        return self._engine

    def run(self, stop: threading.Event) -> None:
        log.info("worker %s started", self.id)
        while not stop.is_set():
            try:
                if not self.run_once():
                    stop.wait(self.settings.poll_seconds)
            except FatalEngineError:
                log.exception("worker %s: engine is unusable; stopping", self.id)
                break
            except Exception:  # the database went away for a moment: back off, never die
                log.exception("worker %s: loop error", self.id)
                stop.wait(min(5.0, self.settings.poll_seconds * 4))
        if self._engine is not None:
            self._engine.close()
        log.info("worker %s stopped after %d jobs", self.id, self.jobs_done)

    def run_once(self) -> bool:
        """Claim and run one job. False when there was nothing to do."""
        self.store.requeue_expired()
        job = self.store.claim(self.id, self.settings.lease_seconds)
        if job is None:
            return False
        self.process(job)
        return True

    def process(self, job: JobRecord) -> None:
        log.info("worker %s runs %s (attempt %d)", self.id, job.id, job.attempts)
        started = clock.monotonic()
        with _Lease(self.store, job.id, self.id, self.settings) as lease:
            try:
                request = job.generation_request()
                init = self._load_init_image(request.init_image)
                result = self.engine.generate(request, init, lease.progress)
                self._finish(job, result, started)
            except JobCancelled:
                self.store.finish_cancelled(job.id, self.id)
            except LeaseLost:
                log.warning("worker %s lost the lease on %s; dropping its work", self.id, job.id)
            except FatalEngineError as exc:
                self.store.fail(job.id, self.id, exc.to_dict(), retry_in=1.0)
                raise
            except (EngineError, DarkroomError) as exc:
                self.store.fail(job.id, self.id, exc.to_dict())
            except Exception as exc:
                log.exception("job %s failed unexpectedly", job.id)
                error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}", "field": None}
                self.store.fail(job.id, self.id, error, retry_in=self._backoff(job.attempts))

    @staticmethod
    def _backoff(attempt: int) -> float:
        return min(60.0, 2.0 ** max(0, attempt - 1))

    def _load_init_image(self, ref: str | None) -> Any:
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
        common = {
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
        new_images = []
        for index, item in enumerate(result.images):
            png = encode_png(item.image, {**common, "seed": item.seed, "image_index": index})
            digest, key = self.blobs.put(png, "image/png")
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
                )
            )
        seeds = [i.seed for i in result.images]
        if self.store.complete(job.id, self.id, new_images, {**common, "seeds": seeds}):
            self.jobs_done += 1
        else:
            log.warning("worker %s finished %s but no longer owns it; result dropped", self.id, job.id)
