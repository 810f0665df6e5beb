"""Pruning and compaction on a real SQLite store, with jobs run by the real worker and engine on the tiny model."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from darkroom import clock
from darkroom.auth.principal import Principal
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import PruneSettings, Settings
from darkroom.jobs import blob_refs
from darkroom.jobs.db import read_tx
from darkroom.jobs.prune import Pruner
from darkroom.jobs.tables import images, job_events, job_uploads, jobs
from darkroom.jobs.workers import WorkerInfo, WorkerRegistry
from darkroom.jobs.workers_table import workers
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.storage.retention import RetentionSweeper
from darkroom.worker.loop import Worker

TABLES = {"jobs": jobs, "job_events": job_events, "images": images, "workers": workers}


@pytest.fixture
def svc(tmp_path: Path, models_dir: Path) -> Iterator[Services]:
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        heartbeat_seconds=0.05,
        progress_interval=0,
        preview_every_seconds=0,
        batch_window_seconds=0,
        prune=PruneSettings(finished_jobs_days=30, deliveries_days=7, workers_days=1, batch_size=3),
    )
    services = Services.open(settings)
    yield services
    services.close()


def run_jobs(svc: Services, n: int, worker_id: str = "w-prune") -> list[str]:
    """`n` jobs with live previews, run to completion by a real worker (which registers, then stops)."""
    ids = []
    for seed in range(n):
        body = {"prompt": "a cube", "width": 64, "height": 64, "steps": 3, "seed": seed, "preview": True}
        ids.append(svc.store.create(GenerationRequest(model="tiny-diffusers", **body))[0].id)
    worker = Worker(svc.settings, svc.store, svc.blobs, svc.make_engine, worker_id=worker_id)
    while worker.run_once():
        pass
    worker.engine.close()
    registry = WorkerRegistry(svc.store.engine)
    registry.register(WorkerInfo(id=worker_id, host="h", pid=1, device="cpu"))
    registry.mark_stopped(worker_id)
    assert all(svc.store.get(i).state is JobState.succeeded for i in ids)
    return ids


def rows(svc: Services) -> dict[str, int]:
    with read_tx(svc.store.engine) as conn:
        return {
            name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for name, t in TABLES.items()
        }


def progress_events(svc: Services, job_ids: list[str]) -> int:
    query = sa.select(sa.func.count()).where(job_events.c.job_id.in_(job_ids), job_events.c.type == "progress")
    with read_tx(svc.store.engine) as conn:
        return conn.execute(query).scalar_one()


def test_finished_jobs_lose_progress_events_and_their_previews(svc: Services) -> None:
    ids = run_jobs(svc, 4)
    assert progress_events(svc, ids) >= 4 * 3
    previews = [e for e in svc.store.events_since(ids[0]) if e.data.get("preview")]
    assert previews, "the jobs asked for previews"
    counts = Pruner(svc.store.engine, svc.blobs, svc.settings.prune).run()
    assert progress_events(svc, ids) == 0 and counts.events_compacted >= 12
    kinds = {e.type for e in svc.store.events_since(ids[0])}
    assert "succeeded" in kinds and "progress" not in kinds  # the outcome stays; the step-by-step noise goes


def test_growth_stays_bounded_after_many_jobs(svc: Services) -> None:
    pruner = Pruner(svc.store.engine, svc.blobs, svc.settings.prune)
    later = lambda days: clock.utcnow() + dt.timedelta(days=days)  # noqa: E731
    sizes = []
    for round_ in range(3):
        ids = run_jobs(svc, 4, worker_id=f"w-{round_}")
        keys = [i.blob_key for job_id in ids for i in svc.store.images_for(job_id)]
        pruner.run(now=later(31))  # every finished job is past its age now
        sizes.append(rows(svc))
        assert not any(svc.blobs.exists(k) for k in keys), "pruned jobs take their unshared image bytes"
    assert sizes[0] == sizes[1] == sizes[2] == {"jobs": 0, "job_events": 0, "images": 0, "workers": 0}


def test_young_and_unfinished_jobs_stay(svc: Services) -> None:
    done = run_jobs(svc, 1)
    queued = svc.store.create(
        GenerationRequest(prompt="later", width=64, height=64, steps=3, seed=1, model="tiny-diffusers")
    )
    counts = Pruner(svc.store.engine, svc.blobs, svc.settings.prune).run(now=clock.utcnow() + dt.timedelta(days=29))
    assert counts.jobs_deleted == 0 and svc.store.get(done[0]) is not None
    Pruner(svc.store.engine, svc.blobs, svc.settings.prune).run(now=clock.utcnow() + dt.timedelta(days=400))
    assert svc.store.get(done[0]) is None and svc.store.get(queued[0].id).state is JobState.queued


def test_a_jobs_previews_are_gone_once_retention_deletes_its_images(svc: Services) -> None:
    ids = run_jobs(svc, 2)
    svc.tenants.put("default", TenantPolicy(image_ttl_days=1), Principal.cli())
    assert progress_events(svc, ids) > 0
    RetentionSweeper(svc.store.engine, svc.blobs, svc.settings).sweep(now=clock.utcnow() + dt.timedelta(days=2))
    assert all(i.deleted_at is not None for job_id in ids for i in svc.store.images_for(job_id))
    assert progress_events(svc, ids) == 0


def explain(svc: Services, query: sa.Select) -> str:
    compiled = query.compile(dialect=svc.store.engine.dialect, compile_kwargs={"render_postcompile": True})
    params = tuple(compiled.params[name] for name in compiled.positiontup or ())
    with svc.store.engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params).all()
    return "\n".join(str(row[-1]) for row in plan)


def test_every_sweep_query_reads_an_index_not_a_whole_table(svc: Services) -> None:
    queries = Pruner(svc.store.engine, svc.blobs, svc.settings.prune).queries(clock.utcnow())
    plans = {name: explain(svc, q) for name, q in {**queries, **blob_ref_queries()}.items()}
    for name, plan in plans.items():
        assert "USING" in plan, f"{name}: {plan}"
        for table in ("jobs", "job_events", "images", "webhook_deliveries", "workers"):
            assert f"SCAN {table}\n" not in plan + "\n" and not plan.endswith(f"SCAN {table}"), f"{name}: {plan}"
        assert "TEMP B-TREE" not in plan, f"{name}: {plan}"
    assert "ix_job_events_type_id" in plans["events"]
    assert "ix_jobs_state_finished_at" in plans["jobs"]
    assert "ix_webhook_deliveries_state_updated_at" in plans["deliveries"]
    assert "ix_images_blob_key" in plans["blob_refs"]
    assert "ix_job_uploads_blob_key" in plans["upload_refs"]


def blob_ref_queries() -> dict[str, sa.Select]:
    """What `_delete_bytes` asks: is a blob still used by another image row, by another job's uploads (and which
    uploads the pruned jobs have)?"""
    keys = {"ab/cd/" + "0" * 64}
    return {
        "blob_refs": blob_refs.live_images_query(keys, ["img_x"]),
        "upload_refs": blob_refs.referenced_query(keys, ["job_x"]),
        "uploads_of_jobs": blob_refs.keys_of_query(["job_x"]),
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def store_and_blobs(request, tmp_path: Path):  # type: ignore[no-untyped-def]
    from darkroom.jobs.db import migrate
    from darkroom.jobs.store import JobStore
    from darkroom.storage.local import LocalBlobStore

    url = f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    migrate(url, lock_dir=tmp_path)
    store = JobStore(url)
    yield store, LocalBlobStore(tmp_path / "blobs")
    store.close()


def test_pruning_runs_in_bounded_batches_on_sqlite_and_postgresql(store_and_blobs) -> None:  # type: ignore[no-untyped-def]
    from darkroom.jobs.store import NewImage

    store, blobs = store_and_blobs
    ids = []
    for seed in range(7):
        job, _ = store.create(GenerationRequest(prompt="p", width=64, height=64, steps=2, seed=seed))
        claimed = store.claim("w", 30)
        assert claimed is not None and claimed.id == job.id
        store.start(job.id, "w")
        store.progress(job.id, "w", 1, 2, 30, preview="data:image/jpeg;base64,AAAA")
        digest, key = blobs.put(f"png {seed}".encode(), "image/png")
        image = NewImage(
            index=0, seed=seed, width=64, height=64, sha256=digest, blob_key=key, content_type="image/png", size_bytes=5
        )
        assert store.complete(job.id, "w", [image], {"timings": {}})
        ids.append(job.id)
    pruner = Pruner(store.engine, blobs, PruneSettings(batch_size=3))
    assert pruner.run().events_compacted == 7
    assert all(not [e for e in store.events_since(i) if e.type == "progress"] for i in ids)
    counts = pruner.run(now=clock.utcnow() + dt.timedelta(days=91))
    assert (counts.jobs_deleted, counts.blobs_deleted) == (7, 7)
    assert all(store.get(i) is None for i in ids)


def test_sweep_queries_use_their_indexes_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    from darkroom.jobs.db import migrate
    from darkroom.jobs.store import JobStore
    from darkroom.storage.local import LocalBlobStore

    migrate(pg_url, lock_dir=tmp_path)
    store = JobStore(pg_url)
    try:
        pruner = Pruner(store.engine, LocalBlobStore(tmp_path / "blobs"), PruneSettings())
        queries = {**pruner.queries(clock.utcnow()), **blob_ref_queries()}
        with store.engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            for name, query in queries.items():
                compiled = query.compile(dialect=store.engine.dialect, compile_kwargs={"render_postcompile": True})
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params))
                assert "Seq Scan" not in plan, f"{name}: {plan}"
    finally:
        store.close()


def test_a_pruned_jobs_upload_stays_while_another_job_uses_it(store_and_blobs) -> None:  # type: ignore[no-untyped-def]
    """Uploads are content-addressed: pruning one job that used a source image keeps the bytes for the job that still
    does, and pruning that one takes them (with every `job_uploads` row)."""
    store, blobs = store_and_blobs
    _, source = blobs.put(b"source bytes", "image/png")
    _, mask = blobs.put(b"mask bytes", "image/png")
    pruner = Pruner(store.engine, blobs, PruneSettings(finished_jobs_days=30, batch_size=3))

    def finished(**uploads: str) -> str:
        body = {"prompt": "p", "width": 64, "height": 64, "steps": 2, "seed": 1}
        job, _ = store.create(GenerationRequest(**body, **{f: f"blob:{key}" for f, key in uploads.items()}))
        assert store.claim("w", 30).id == job.id
        assert store.complete(job.id, "w", [], {"timings": {}})
        return job.id

    finished(init_image=source, mask_image=mask)
    assert pruner.run(now=clock.utcnow() + dt.timedelta(days=31)).jobs_deleted == 1
    assert not blobs.exists(source) and not blobs.exists(mask), "nothing else used them"

    _, source = blobs.put(b"source bytes", "image/png")
    older = finished(init_image=source)
    later = clock.utcnow() + dt.timedelta(days=31)
    queued, _ = store.create(
        GenerationRequest(prompt="q", width=64, height=64, steps=2, seed=2, init_image=f"blob:{source}")
    )
    counts = pruner.run(now=later)
    assert (counts.jobs_deleted, counts.blobs_deleted) == (1, 0) and store.get(older) is None
    assert blobs.exists(source), "the queued job still needs its source"
    assert store.claim("w", 30).id == queued.id and store.complete(queued.id, "w", [], {"timings": {}})
    assert pruner.run(now=later + dt.timedelta(days=31)).blobs_deleted == 1 and not blobs.exists(source)
    with read_tx(store.engine) as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(job_uploads)).scalar_one() == 0
