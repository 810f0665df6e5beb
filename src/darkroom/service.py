"""Wiring: build the parts from one Settings object. The API, the CLI and the tests all start here."""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from darkroom.auth.audit import AuditLog
from darkroom.auth.keys import KeyStore
from darkroom.auth.tenants import TenantStore
from darkroom.config import Settings
from darkroom.engines.base import Engine
from darkroom.engines.routing import Route, is_remote
from darkroom.engines.shared import EnginePool
from darkroom.extras import require, require_worker
from darkroom.jobs.db import migrate
from darkroom.jobs.notify import ChangeFeed
from darkroom.jobs.store import JobStore
from darkroom.jobs.workers import WorkerRegistry
from darkroom.models.registry import ModelRegistry
from darkroom.storage import BlobStore, open_blob_store
from darkroom.worker.loop import Worker, default_worker_id
from darkroom.worker.processes import WorkerProcesses
from darkroom.worker.supervisor import Supervisor

if TYPE_CHECKING:
    from darkroom.models.approvals import Approvals  # the module imports this one's neighbours: imported when used

log = logging.getLogger("darkroom")


@dataclass
class Services:
    settings: Settings
    store: JobStore
    blobs: BlobStore
    registry: ModelRegistry
    audit: AuditLog
    tenants: TenantStore
    keys: KeyStore
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    workers: list[Worker] = field(default_factory=list)
    _supervisor: Supervisor | None = None
    _processes: WorkerProcesses | None = None  # `serve`'s worker processes (darkroom.worker.processes)
    feed: ChangeFeed | None = None  # the process's one change feed (waiters, idle workers); starts on first use
    _engines: EnginePool = field(init=False)  # the device's one engine, shared by this process's workers

    route: Route = field(init=False)  # routing state shared by the process's workers (circuit, concurrency)

    def __post_init__(self) -> None:
        self._engines = EnginePool(self._new_engine)
        self.route = Route(self.settings)

    @classmethod
    def open(cls, settings: Settings) -> Services:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
        if url.startswith("postgresql"):
            require("postgres", ("psycopg",), "a PostgreSQL database_url")
        migrate(url, lock_dir=settings.data_dir)
        models_dir = settings.resolved_models_dir
        models_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(
            url,
            max_queue_depth=settings.limits.max_queue_depth,
            max_tenant_queue_depth=settings.limits.max_tenant_queue_depth,
            tenant_weights=settings.tenant_weights,
        )
        return cls(
            settings=settings,
            store=store,
            blobs=open_blob_store(settings),
            registry=ModelRegistry.for_settings(settings),
            audit=AuditLog(store.engine),
            tenants=TenantStore(store.engine),
            keys=KeyStore(store.engine),
            feed=ChangeFeed(url, store.engine, check_seconds=settings.feed_check_seconds),
        )

    @functools.cached_property
    def approvals(self) -> Approvals:
        """The model versions and the decisions on them (`models.approvals`), built once: every submit checks them."""
        from darkroom.models.approvals import Approvals

        return Approvals.for_services(self)

    def ensure_default_model(self) -> None:
        """With no models at all, install the built-in demo model (`darkroom.demo`) so the service works offline."""
        require_worker()  # every worker role starts here: a base install says which extra it lacks, up front
        if self.registry.scan() or not self.settings.create_default_model:
            return
        from darkroom.demo.install import ensure_default_model

        path, what = ensure_default_model(self.settings.resolved_models_dir)
        if path is not None:  # darkroom's own model: approved as written (`models.approvals.approve_own_model`)
            from darkroom.models.approvals import approve_own_model

            approve_own_model(self, path)
        log.warning(
            "No models found: created %s at %s. "
            "Add real checkpoints with `darkroom models add PATH` or drop .safetensors files or diffusers "
            "folders into %s.",
            what,
            path,
            self.settings.resolved_models_dir,
        )

    def approve_models(self) -> dict[str, str]:
        """An API node records the models its folder holds when it starts: a name never seen before waits for an
        operator unless `security.approve_first_seen_models` is on; a changed file waits for an operator
        (`darkroom.models.approvals`). Returns checkpoint id → the approved sha256 workers serve."""
        from darkroom.auth.principal import DEFAULT_TENANT, Principal, Role

        approvals = self.approvals
        found = [("checkpoint", m.id, m.sha256, m.path) for m in self.registry.scan()]
        system = Principal(actor="system:startup", role=Role.admin, tenant=DEFAULT_TENANT)
        recorded = approvals.observe(found)
        records = approvals.all()
        for key in recorded:  # a first-seen name's record says who and when itself; a changed file is audited
            if len(records[key].versions) > 1:
                newest = records[key].versions[-1]
                details = {"sha256": newest.sha256, "approved": newest.approved}
                self.audit.record(system, "model.version", key, details)
        return approvals.approved_map()

    def make_engine(self) -> Engine:
        """A share of this process's engine (`engines.shared`): its worker threads hold one copy of each model."""
        return self._engines.share()

    def _new_engine(self) -> Engine:
        """The engine `settings.engine` names: the local device, or a remote backend driven over its API."""
        s = self.settings
        if is_remote(s):
            from darkroom.engines.remote_http import build_remote

            return build_remote(s)
        require_worker()
        from darkroom.engines.acceleration import Acceleration  # torch stays out of API-only processes
        from darkroom.engines.diffusers_engine import DiffusersEngine, resolve_device

        device = resolve_device(s.device)
        return DiffusersEngine(
            self.registry,
            device=device,
            dtype=s.dtype,
            cache_size=s.pipeline_cache_size,
            batch_invariant=s.batch_invariant,
            cache_bytes=s.pipeline_cache_bytes,
            allow_pickle=s.security.allow_pickle_models,
            acceleration=Acceleration.from_settings(s.gpu, device, s.inductor_cache_dir),
        )

    def start_workers(self, count: int) -> None:
        """Start `count` supervised worker threads (see `darkroom.worker.supervisor`: a thread that crashes is logged,
        shown and restarted with backoff)."""
        if count and self.settings.engine == "diffusers":
            require_worker()
            # torch (through the engine module) is imported here, once, before any worker thread: threads racing to
            # import it see a half-initialised module. API-only processes (count 0) never import it.
            import darkroom.engines.diffusers_engine  # noqa: F401
        if self._supervisor is None:
            registry = WorkerRegistry(self.store.engine)
            self._supervisor = Supervisor(self._new_worker, registry, self.settings.recovery, self._stop, self.workers)
        base = self.settings.worker_id or default_worker_id()
        for _ in range(count):
            slot = self._supervisor.add(f"{base}-{len(self._supervisor.slots)}")
            name = f"worker-{slot.index}"
            thread = threading.Thread(target=self._supervisor.run, args=(slot,), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def start_worker_processes(self, count: int, log_level: str = "info") -> None:
        """Start `count` supervised `darkroom worker` child processes (see `darkroom.worker.processes`): what
        `darkroom serve --workers N` runs, so denoising never holds this process's GIL."""
        if not count:
            return
        require_worker()
        if self._processes is None:
            self._processes = WorkerProcesses(self.settings, WorkerRegistry(self.store.engine), log_level)
        self._processes.start(count, self.settings.worker_id or default_worker_id())

    def _new_worker(self, worker_id: str) -> Worker:
        return Worker(
            self.settings,
            self.store,
            self.blobs,
            self.make_engine,
            worker_id=worker_id,
            registry=self.registry,
            feed=self.feed,
            tenants=self.tenants,
            route=self.route,
        )

    def worker_health(self) -> dict[str, object]:
        """The in-process workers' health for `/readyz`: status `ok` while one of them is healthy (or there are none:
        an API-only node), else `error: …`; per worker its state, condition, crashes and last error."""
        if self._processes is not None:
            return self._processes.health()
        if self._supervisor is None:
            return {"status": "ok", "workers": 0, "healthy": 0, "slots": []}
        return self._supervisor.health()

    def stop_workers(self) -> None:
        """Graceful drain: stop claiming, let running jobs finish within `drain_seconds`, give back the rest."""
        if self._processes is not None:
            self._processes.stop()
        for worker in self.workers:
            worker.begin_drain()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.drain_seconds + 10)
        self._threads.clear()

    def close(self) -> None:
        self.stop_workers()
        if self.feed is not None:
            self.feed.close()
        self.store.close()
