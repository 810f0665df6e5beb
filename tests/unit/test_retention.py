"""Retention: the sweeper deletes what expired and keeps the rest. Real SQLite (PostgreSQL for the multi-process
lease), real blob stores (a local folder; S3 on the moto server), jobs made through the real JobStore and aged by
moving their timestamps back in SQL."""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from darkroom import clock
from darkroom.api.app import create_app
from darkroom.auth.principal import Principal
from darkroom.auth.tables import tenants
from darkroom.auth.tenants import TenantPolicy
from darkroom.cli import app as cli_app
from darkroom.config import Settings
from darkroom.jobs import blob_refs
from darkroom.jobs.db import read_tx, write_tx
from darkroom.jobs.store import NewImage
from darkroom.jobs.tables import images, job_uploads, jobs
from darkroom.schemas import GenerationRequest
from darkroom.service import Services
from darkroom.storage.retention import DELETED, REDACTED, RetentionSweeper, start_for

WORKER = "test-worker"


def settings_for(root: Path, **extra) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(data_dir=root / "data", models_dir=root / "models", create_default_model=False, **extra)


@pytest.fixture
def svc(tmp_path: Path):  # type: ignore[no-untyped-def]
    services = Services.open(settings_for(tmp_path))
    yield services
    services.close()


def png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


def set_policy(svc: Services, tenant: str, **ttls: float) -> None:
    svc.tenants.put(tenant, TenantPolicy(**ttls), Principal.cli())


def make_job(
    svc: Services,
    tenant: str,
    *,
    age_days: float = 0.0,
    outputs: tuple[bytes, ...] = (),
    state: str = "succeeded",
    prompt: str = "a secret lighthouse",
    negative: str = "",
    uploads: dict[str, bytes] | None = None,
) -> str:
    """A job through the real store: created, claimed, then finished (or left queued / running), then aged."""
    refs = {field: f"blob:{svc.blobs.put(data, 'image/png')[1]}" for field, data in (uploads or {}).items()}
    body = GenerationRequest(
        prompt=prompt, negative_prompt=negative, width=64, height=64, steps=2, seed=1, model="tiny", **refs
    )
    job, _ = svc.store.create(body, tenant=tenant)
    if state != "queued":
        claimed = svc.store.claim(WORKER, 60)
        assert claimed is not None and claimed.id == job.id  # queued jobs are made last in each test
    if state == "succeeded":
        new = [new_image(svc, i, data) for i, data in enumerate(outputs)]
        assert svc.store.complete(job.id, WORKER, new, {"request": job.request, "seeds": [1]})
    elif state == "failed":
        svc.store.fail(job.id, WORKER, {"code": "engine_error", "message": "boom", "field": None})
    age(svc, job.id, age_days)
    return job.id


def new_image(svc: Services, index: int, data: bytes) -> NewImage:
    digest, key = svc.blobs.put(data, "image/png")
    return NewImage(index, 1 + index, 8, 8, digest, key, "image/png", len(data))


def age(svc: Services, job_id: str, days: float) -> None:
    then = clock.utcnow() - dt.timedelta(days=days)
    with write_tx(svc.store.engine) as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(created_at=then))
        conn.execute(images.update().where(images.c.job_id == job_id).values(created_at=then))


def key_of(data: bytes) -> str:
    from darkroom.storage import content_key

    return content_key(data)[1]


def sweeps(svc: Services) -> list:
    return svc.audit.list(action="retention.sweep")


def sweeper(svc: Services, **kw) -> RetentionSweeper:  # type: ignore[no-untyped-def]
    return RetentionSweeper(svc.store.engine, svc.blobs, svc.settings, **kw)


# --- images ----------------------------------------------------------------------------------------------------------


def test_expired_images_lose_their_bytes_and_fresh_or_shared_ones_stay(svc: Services) -> None:
    set_policy(svc, "acme", image_ttl_days=7)
    set_policy(svc, "other", prompt_ttl_days=365)  # a TTL, but not for images
    old, fresh, shared = png((1, 0, 0)), png((2, 0, 0)), png((3, 0, 0))
    old_job = make_job(svc, "acme", age_days=10, outputs=(old, shared))
    fresh_job = make_job(svc, "acme", age_days=1, outputs=(fresh,))
    also_shared = make_job(svc, "keep", age_days=100, outputs=(shared,))  # no policy at all: kept forever
    other_job = make_job(svc, "other", age_days=100, outputs=(png((4, 0, 0)),))

    report = sweeper(svc).sweep()

    assert report["acme"] == {"images_deleted": 2, "uploads_deleted": 0, "blobs_deleted": 1, "prompts_redacted": 0}
    assert report["other"]["images_deleted"] == 0 and "keep" not in report
    assert not svc.blobs.exists(key_of(old))
    assert svc.blobs.exists(key_of(shared)), "another tenant's live image still uses these bytes"
    assert svc.blobs.exists(key_of(fresh))
    assert all(i.deleted_at is not None for i in svc.store.images_for(old_job))
    for job_id in (fresh_job, also_shared, other_job):
        assert all(i.deleted_at is None and i.released for i in svc.store.images_for(job_id))
    assert svc.store.get(old_job) is not None, "the job and image rows stay as the record"


def test_the_last_reference_to_expire_takes_the_shared_bytes(svc: Services) -> None:
    set_policy(svc, "acme", image_ttl_days=7)
    shared = png((5, 5, 5))
    make_job(svc, "acme", age_days=10, outputs=(shared,))
    later = make_job(svc, "acme", age_days=3, outputs=(shared,))
    sweeper(svc).sweep()
    assert svc.blobs.exists(key_of(shared))
    report = sweeper(svc).sweep(now=clock.utcnow() + dt.timedelta(days=5))
    assert report["acme"]["images_deleted"] == 1 and report["acme"]["blobs_deleted"] == 1
    assert not svc.blobs.exists(key_of(shared))
    assert svc.store.images_for(later)[0].deleted_at is not None


def test_one_audit_record_per_tenant_and_a_second_sweep_changes_nothing(svc: Services) -> None:
    set_policy(svc, "acme", image_ttl_days=7, prompt_ttl_days=3)
    set_policy(svc, "beta", image_ttl_days=1)
    make_job(svc, "acme", age_days=10, outputs=(png((6, 0, 0)),))
    make_job(svc, "beta", age_days=0.5, outputs=(png((7, 0, 0)),))  # nothing of beta's has expired
    first = sweeper(svc).sweep()
    records = sweeps(svc)
    assert [(r.tenant, r.actor, r.target) for r in records] == [("acme", "system:retention", "acme")]
    assert records[0].details == {
        "images_deleted": 1,
        "uploads_deleted": 0,
        "blobs_deleted": 1,
        "prompts_redacted": 1,
        "image_ttl_days": 7.0,
        "prompt_ttl_days": 3.0,
    }
    assert first["beta"] == {"images_deleted": 0, "uploads_deleted": 0, "blobs_deleted": 0, "prompts_redacted": 0}
    second = sweeper(svc).sweep()
    assert all(not any(counts.values()) for counts in second.values())
    assert len(sweeps(svc)) == 1


def test_large_backlogs_go_in_batches(svc: Services) -> None:
    set_policy(svc, "acme", image_ttl_days=1, prompt_ttl_days=1)
    outputs = [png((10 + i, 0, 0)) for i in range(7)]
    for data in outputs:
        make_job(svc, "acme", age_days=2, outputs=(data,))
    report = sweeper(svc, batch_size=3).sweep()
    assert report["acme"] == {"images_deleted": 7, "uploads_deleted": 0, "blobs_deleted": 7, "prompts_redacted": 7}
    assert not any(svc.blobs.exists(key_of(data)) for data in outputs)


# --- uploads ---------------------------------------------------------------------------------------------------------


def test_uploads_of_old_finished_jobs_are_deleted_unless_still_in_use(svc: Services) -> None:
    set_policy(svc, "acme", image_ttl_days=7)
    source, mask, pending_source = png((20, 0, 0)), png((255, 255, 255)), png((21, 0, 0))
    old = make_job(svc, "acme", age_days=10, uploads={"init_image": source, "mask_image": mask})
    fresh = make_job(svc, "acme", age_days=1, uploads={"init_image": source})
    waiting = make_job(svc, "acme", age_days=10, state="queued", uploads={"init_image": pending_source})

    report = sweeper(svc).sweep()

    assert report["acme"]["uploads_deleted"] == 1 and report["acme"]["blobs_deleted"] == 1
    assert not svc.blobs.exists(key_of(mask))
    assert svc.blobs.exists(key_of(source)), "a fresh job still uses the same source image"
    assert svc.blobs.exists(key_of(pending_source)), "a queued job still needs its source"
    job = svc.store.require(old)
    assert job.request["init_image"] == job.request["mask_image"] == DELETED
    assert job.result["request"]["init_image"] == DELETED
    assert svc.store.require(fresh).request["init_image"].startswith("blob:")
    assert svc.store.require(waiting).request["init_image"].startswith("blob:")


# --- prompts ---------------------------------------------------------------------------------------------------------


def test_prompts_are_redacted_past_the_ttl_in_request_and_provenance(svc: Services) -> None:
    set_policy(svc, "acme", prompt_ttl_days=30)
    old = make_job(svc, "acme", age_days=40, negative="blurry", outputs=(png((30, 0, 0)),))
    failed = make_job(svc, "acme", age_days=40, state="failed")
    fresh = make_job(svc, "acme", age_days=10)
    elsewhere = make_job(svc, "other", age_days=400)
    running = make_job(svc, "acme", age_days=40, state="running")
    queued = make_job(svc, "acme", age_days=40, state="queued")

    report = sweeper(svc).sweep()

    assert report["acme"]["prompts_redacted"] == 2
    job = svc.store.require(old)
    assert (job.request["prompt"], job.request["negative_prompt"]) == (REDACTED, REDACTED)
    assert (job.result["request"]["prompt"], job.result["request"]["negative_prompt"]) == (REDACTED, REDACTED)
    assert job.prompt_redacted_at is not None
    assert svc.store.require(failed).request["prompt"] == REDACTED
    assert svc.store.require(failed).request["negative_prompt"] == ""
    for job_id in (fresh, elsewhere, running, queued):
        kept = svc.store.require(job_id)
        assert kept.request["prompt"] == "a secret lighthouse" and kept.prompt_redacted_at is None
    assert svc.blobs.exists(key_of(png((30, 0, 0)))), "a prompt TTL leaves images alone"
    assert svc.store.images_for(old)[0].deleted_at is None


# --- where it shows ---------------------------------------------------------------------------------------------------


def test_a_deleted_image_is_404_over_the_api(svc: Services) -> None:
    set_policy(svc, "default", image_ttl_days=7)
    job_id = make_job(svc, "default", age_days=10, outputs=(png((40, 0, 0)),))
    image_id = svc.store.images_for(job_id)[0].id
    with TestClient(create_app(svc)) as api:
        assert api.get(f"/v1/images/{image_id}").status_code == 200
        sweeper(svc).sweep()
        response = api.get(f"/v1/images/{image_id}")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["field"] == "image_id"
        view = api.get(f"/v1/jobs/{job_id}").json()
        assert view["images"][0]["url"] is None


def test_cli_sweep_prints_the_report(tmp_path: Path) -> None:
    services = Services.open(settings_for(tmp_path))
    try:
        set_policy(services, "acme", image_ttl_days=1)
        make_job(services, "acme", age_days=2, outputs=(png((50, 0, 0)),))
    finally:
        services.close()
    result = CliRunner().invoke(cli_app, ["retention", "sweep", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["acme"]["images_deleted"] == 1 and report["acme"]["blobs_deleted"] == 1


def test_background_sweeper_survives_errors_and_stops(svc: Services) -> None:
    """A tenant row that fails validation makes a sweep fail; the thread logs it and the next sweep goes on."""
    with write_tx(svc.store.engine) as conn:
        now = clock.utcnow()
        conn.execute(tenants.insert().values(id="acme", policy={"image_ttl_days": -1}, created_at=now, updated_at=now))
    job_id = make_job(svc, "acme", age_days=10, outputs=(png((60, 0, 0)),))
    svc.settings.security.retention_sweep_seconds = 0.05
    thread = start_for(svc.settings, svc)
    try:
        time.sleep(0.3)  # several failing sweeps
        assert thread._thread.is_alive()
        with write_tx(svc.store.engine) as conn:
            conn.execute(tenants.update().where(tenants.c.id == "acme").values(policy={"image_ttl_days": 7}))
        deadline = time.monotonic() + 10
        while svc.store.images_for(job_id)[0].deleted_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.store.images_for(job_id)[0].deleted_at is not None
    finally:
        thread.stop()
    assert not thread._thread.is_alive()


# --- other stores ----------------------------------------------------------------------------------------------------


def test_sweep_deletes_from_s3(tmp_path: Path, s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    from darkroom.config import StorageSettings
    from tests.infra.s3 import ACCESS_KEY, REGION, SECRET_KEY

    storage = StorageSettings(
        blob_backend="s3",
        s3_bucket=s3_bucket,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=REGION,
        s3_access_key_id=ACCESS_KEY,
        s3_secret_access_key=SECRET_KEY,
    )
    services = Services.open(settings_for(tmp_path, storage=storage))
    try:
        set_policy(services, "acme", image_ttl_days=7)
        old, fresh = png((70, 0, 0)), png((71, 0, 0))
        make_job(services, "acme", age_days=10, outputs=(old,))
        make_job(services, "acme", age_days=1, outputs=(fresh,))
        assert services.blobs.exists(key_of(old))
        assert sweeper(services).sweep()["acme"]["blobs_deleted"] == 1
        assert not services.blobs.exists(key_of(old)) and services.blobs.exists(key_of(fresh))
        services.blobs.delete(key_of(old))  # deleting what is gone is not an error
    finally:
        services.close()


def test_concurrent_sweepers_on_postgresql_record_the_work_once(tmp_path: Path, pg_url: str) -> None:
    """Every API process runs a sweeper: on a shared database one sweeps at a time, and the audit says it once."""
    nodes = [Services.open(settings_for(tmp_path, database_url=pg_url)) for _ in range(2)]
    try:
        svc = nodes[0]
        set_policy(svc, "acme", image_ttl_days=7, prompt_ttl_days=7)
        for i in range(6):
            make_job(svc, "acme", age_days=10, outputs=(png((80 + i, 0, 0)),), negative="dark")
        reports: list[dict] = []
        threads = [
            threading.Thread(target=lambda node=node: reports.append(sweeper(node, batch_size=2).sweep()))
            for node in nodes
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        total = {k: sum(r.get("acme", {}).get(k, 0) for r in reports) for k in ("images_deleted", "prompts_redacted")}
        assert total == {"images_deleted": 6, "prompts_redacted": 6}
        assert len(sweeps(svc)) == 1
        assert sweeper(nodes[1]).sweep()["acme"]["images_deleted"] == 0
    finally:
        for node in nodes:
            node.close()


# --- who still uses an upload: the job_uploads index, on SQLite and PostgreSQL ---------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path: Path):  # type: ignore[no-untyped-def]
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    services = Services.open(settings_for(tmp_path, **({"database_url": url} if url else {})))
    yield services
    services.close()


def upload_rows(svc: Services, job_id: str) -> set[str]:
    with read_tx(svc.store.engine) as conn:
        return set(conn.execute(sa.select(job_uploads.c.blob_key).where(job_uploads.c.job_id == job_id)).scalars())


def test_a_shared_upload_lives_while_any_job_uses_it_and_goes_with_the_last(any_db: Services) -> None:
    svc = any_db
    set_policy(svc, "acme", image_ttl_days=7)
    set_policy(svc, "beta", image_ttl_days=7)
    source, mask = png((90, 0, 0)), png((91, 0, 0))
    old = make_job(svc, "acme", age_days=10, uploads={"init_image": source, "mask_image": mask})
    other_tenant = make_job(svc, "beta", age_days=3, uploads={"init_image": source})
    same_bytes_twice = make_job(svc, "beta", age_days=3, uploads={"init_image": mask, "mask_image": mask})
    assert upload_rows(svc, old) == {key_of(source), key_of(mask)}
    assert upload_rows(svc, same_bytes_twice) == {key_of(mask)}
    assert upload_rows(svc, make_job(svc, "acme", age_days=10)) == set(), "txt2img writes no upload rows"

    report = sweeper(svc).sweep()
    assert report["acme"]["uploads_deleted"] == 1 and report["acme"]["blobs_deleted"] == 0
    assert svc.blobs.exists(key_of(source)) and svc.blobs.exists(key_of(mask)), "beta's jobs still use both"
    assert svc.store.require(old).request["init_image"] == DELETED and upload_rows(svc, old) == set()

    age(svc, other_tenant, 10)
    report = sweeper(svc).sweep()
    assert report["beta"]["uploads_deleted"] == 1 and report["beta"]["blobs_deleted"] == 1
    assert not svc.blobs.exists(key_of(source)), "the last job to use it took the bytes"
    assert svc.blobs.exists(key_of(mask))

    age(svc, same_bytes_twice, 10)
    assert sweeper(svc).sweep()["beta"]["blobs_deleted"] == 1 and not svc.blobs.exists(key_of(mask))
    with read_tx(svc.store.engine) as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(job_uploads)).scalar_one() == 0
    assert sweeper(svc).sweep()["beta"] == {
        "images_deleted": 0,
        "uploads_deleted": 0,
        "blobs_deleted": 0,
        "prompts_redacted": 0,
    }


def sweep_queries(svc: Services) -> dict[str, sa.Select]:
    """Every query a sweep runs to choose its batches and to ask whether a blob is still referenced."""
    keys, skip = {"ab/cd/" + "0" * 64, "ab/cd/" + "1" * 64}, ["job_x", "job_y"]
    return {
        **sweeper(svc).queries("acme", clock.utcnow(), ttl_days=7),
        "live_images": blob_refs.live_images_query(keys, ["img_x"]),
        "live_uploads": blob_refs.referenced_query(keys, skip),
        "uploads_of_jobs": blob_refs.keys_of_query(skip),
    }


def test_sweep_queries_read_indexes_not_whole_tables_on_sqlite(svc: Services) -> None:
    for i in range(3):  # a few rows, so the planner has something to weigh
        make_job(svc, "acme", age_days=10, uploads={"init_image": png((100 + i, 0, 0))})
    plans = {}
    with svc.store.engine.connect() as conn:
        for name, query in sweep_queries(svc).items():
            compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
            params = tuple(compiled.params[p] for p in compiled.positiontup or ())
            plans[name] = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params)]
    for name, plan in plans.items():
        full_scans = [step for step in plan if step.startswith("SCAN ") and " USING " not in step]
        assert not full_scans, f"{name}: {plan}"
    assert any("ix_job_uploads_blob_key" in step for step in plans["live_uploads"]), plans["live_uploads"]


def test_sweep_queries_read_indexes_not_whole_tables_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    services = Services.open(settings_for(tmp_path, database_url=pg_url))
    try:
        make_job(services, "acme", age_days=10, uploads={"init_image": png((110, 0, 0))})
        with services.store.engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            for name, query in sweep_queries(services).items():
                compiled = query.compile(
                    dialect=services.store.engine.dialect, compile_kwargs={"render_postcompile": True}
                )
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params))
                assert "Seq Scan" not in plan, f"{name}: {plan}"
    finally:
        services.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_migration_backfills_uploads_of_existing_jobs(backend: str, tmp_path: Path, request) -> None:  # type: ignore[no-untyped-def]
    """Jobs written before `job_uploads` existed get their rows, across several backfill batches (500 jobs each)."""
    from alembic import command

    from darkroom.jobs.db import alembic_config

    url = f"sqlite:///{tmp_path / 'jobs.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    command.upgrade(alembic_config(url), "0007_pruning")
    now = clock.utcnow()
    base = {"state": "succeeded", "tenant": "acme", "priority": 0, "request_hash": "h", "attempts": 1}
    base |= {"max_attempts": 3, "cancel_requested": False, "progress_step": 0, "progress_total": 0}
    base |= {"created_at": now, "updated_at": now, "available_at": now}

    def request_of(i: int) -> dict:
        if i % 3 == 0:
            return {"prompt": "p"}  # txt2img
        if i % 3 == 1:
            return {"prompt": "p", "init_image": f"blob:aa/{i}", "mask_image": "blob:aa/mask"}
        return {"prompt": "p", "init_image": DELETED, "mask_image": "data:image/png;base64,AAAA"}

    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(jobs.insert(), [{**base, "id": f"job_{i:05d}", "request": request_of(i)} for i in range(1201)])
        command.upgrade(alembic_config(url), "heads")
        with engine.connect() as conn:
            got = {tuple(row) for row in conn.execute(sa.select(job_uploads.c.job_id, job_uploads.c.blob_key))}
    finally:
        engine.dispose()
    with_uploads = [i for i in range(1201) if i % 3 == 1]
    assert got == {(f"job_{i:05d}", key) for i in with_uploads for key in (f"aa/{i}", "aa/mask")}


def test_a_submit_with_uploads_costs_one_insert_more_and_txt2img_none(svc: Services) -> None:
    """The submit transaction is budgeted: `job_uploads` rows are one multi-row INSERT, and only when there are any."""
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    _, source = svc.blobs.put(png((120, 0, 0)), "image/png")
    _, mask = svc.blobs.put(png((121, 0, 0)), "image/png")
    body = {"prompt": "p", "width": 64, "height": 64, "steps": 2, "seed": 1, "model": "tiny"}
    sa.event.listen(svc.store.engine, "before_cursor_execute", count)
    try:
        svc.store.create(GenerationRequest(**body))
        txt2img, statements[:] = list(statements), []
        svc.store.create(GenerationRequest(**body, init_image=f"blob:{source}", mask_image=f"blob:{mask}"))
        img2img = list(statements)
    finally:
        sa.event.remove(svc.store.engine, "before_cursor_execute", count)
    assert not any("job_uploads" in s for s in txt2img)
    extra = [s for s in img2img if "job_uploads" in s]
    assert len(img2img) == len(txt2img) + 1 and len(extra) == 1 and extra[0].startswith("INSERT"), img2img
