"""Cost: each job records its device-seconds and their price, `GET /v1/usage?from&to&group_by` and `darkroom usage`
sum exactly those rows, and `darkroom cost estimate` does the TCO sums.

Real app (TestClient), real SQLite store, a real worker thread with the tiny model, real API keys for two tenants;
the report is checked against the job rows read back with SQL."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from darkroom import clock
from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.cli import app as cli
from darkroom.config import ObservabilitySettings, Settings
from darkroom.jobs.db import migrate
from darkroom.jobs.store import JobStore
from darkroom.jobs.tables import images, jobs
from darkroom.observability.cost import batch_share, usage_report
from darkroom.schemas import GenerationRequest
from darkroom.service import Services

PRICE = 36.0  # per cpu device-hour: a hundredth per second, so costs are easy to read
BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 1}


@pytest.fixture(scope="module")
def billed(tmp_path_factory, models_dir):
    """Three succeeded jobs of two tenants; the services, tokens and the job rows as the store wrote them."""
    obs = ObservabilitySettings(device_hour_prices={"cpu": PRICE}, storage_gb_month_price=2.0)
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("cost") / "data", models_dir=models_dir, poll_seconds=0.05, observability=obs
    )
    svc = Services.open(settings)
    admin = svc.keys.create(Principal.cli(), name="admin", role=Role.admin, tenant="default")[1]
    acme = svc.keys.create(Principal.cli(), name="acme", role=Role.user, tenant="acme")[1]
    with TestClient(create_app(svc, workers=1)) as api:
        for token, n in ((acme, 2), (acme, 1), (admin, 1)):
            done = api.post("/v1/generate", json={**BASE, "n": n}, headers={"Authorization": f"Bearer {token}"})
            assert done.status_code == 200 and done.json()["state"] == "succeeded", done.text
        with svc.store.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(jobs.c.state == "succeeded")).all()
            stored = conn.execute(sa.select(sa.func.sum(images.c.size_bytes))).scalar_one()
        yield {"api": api, "svc": svc, "admin": admin, "acme": acme, "rows": rows, "stored": stored}
    svc.close()


def report(api: TestClient, token: str, **params: str):
    return api.get("/v1/usage", params=params, headers={"Authorization": f"Bearer {token}"})


def window() -> dict[str, str]:
    now = clock.utcnow()
    return {"from": (now - dt.timedelta(days=1)).isoformat(), "to": (now + dt.timedelta(minutes=5)).isoformat()}


def test_each_job_records_its_device_seconds_at_the_configured_price(billed):
    assert len(billed["rows"]) == 3
    for row in billed["rows"]:
        assert row.gpu_seconds > 0
        assert row.cost == pytest.approx(row.gpu_seconds * PRICE / 3600, rel=1e-6)


def test_the_report_by_tenant_equals_the_sum_over_job_records(billed):
    answer = report(billed["api"], billed["admin"], group_by="tenant", **window())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    by_tenant = {r["key"]: r for r in body["rows"]}
    assert set(by_tenant) == {"acme", "default"}
    for tenant, got in by_tenant.items():
        mine = [r for r in billed["rows"] if r.tenant == tenant]
        assert got["jobs"] == len(mine)
        assert got["images"] == sum(r.images_requested for r in mine)
        assert got["device_seconds"] == pytest.approx(sum(r.gpu_seconds for r in mine), abs=1e-3)
        assert got["cost"] == pytest.approx(sum(r.cost for r in mine), rel=1e-6)
    assert body["total"]["images"] == 4 and body["total"]["jobs"] == 3
    assert body["total"]["cost"] == pytest.approx(sum(r.gpu_seconds for r in billed["rows"]) * PRICE / 3600, rel=1e-4)
    assert body["storage"]["bytes"] == billed["stored"]
    assert body["storage"]["cost_per_month"] == pytest.approx(billed["stored"] / 1e9 * 2.0, abs=1e-8)


def test_a_user_reports_on_its_own_tenant_only_and_the_quota_view_is_unchanged(billed):
    api, acme = billed["api"], billed["acme"]
    mine = report(api, acme, group_by="model", **window()).json()
    assert mine["tenant"] == "acme" and mine["total"]["jobs"] == 2 and len(mine["rows"]) == 1
    day = report(api, acme, group_by="day", **window()).json()
    assert [r["key"] for r in day["rows"]] == [f"{clock.utcnow():%Y-%m-%d}"]
    refused = report(api, acme, group_by="tenant", tenant="default", **window())
    assert refused.status_code == 403
    quota = report(api, acme).json()
    assert quota["tenant"] == "acme" and "images_today" in quota and "rows" not in quota
    backwards = report(api, acme, **{"from": "2026-12-02T00:00:00", "to": "2026-12-01T00:00:00"})
    assert backwards.status_code == 422 and backwards.json()["error"]["field"] == "from"
    assert report(api, acme, group_by="week").status_code == 422


def test_darkroom_usage_exports_the_same_report_as_csv(billed):
    svc = billed["svc"]
    result = CliRunner().invoke(
        cli,
        ["usage", "--group-by", "tenant", "--format", "csv", "--data-dir", str(svc.settings.data_dir)],
        env={"DARKROOM_OBSERVABILITY__DEVICE_HOUR_PRICES": json.dumps({"cpu": PRICE})},
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["tenant", "jobs", "images", "device_seconds", "cost_USD"]
    acme = next(r for r in rows if r[0] == "acme")
    assert int(acme[1]) == 2 and int(acme[2]) == 3
    want = sum(r.cost for r in billed["rows"] if r.tenant == "acme")
    assert float(acme[4]) == pytest.approx(want, rel=1e-6)
    assert rows[-1][0] == "total" and float(rows[-1][4]) == pytest.approx(sum(r.cost for r in billed["rows"]), rel=1e-6)


def test_cost_estimate_compares_self_hosted_with_a_per_image_price():
    args = ["cost", "estimate", "--images-per-day", "1000", "--seconds-per-image", "3.6"]
    args += ["--gpu-hour-price", "2.5", "--cloud-price-per-image", "0.04", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["images_per_month"] == pytest.approx(30440)
    assert got["gpu_hours_per_month"] == pytest.approx(30.44)  # 30,440 images × 3.6 s
    assert got["self_hosted_per_month"] == pytest.approx(76.1)
    assert got["cloud_per_month"] == pytest.approx(1217.6)
    assert got["gpus_needed"] == 1
    assert got["savings_per_month"] == pytest.approx(1141.5)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


def test_the_reports_sql_groups_by_utc_day_model_and_tenant_on_both_databases(db_url, tmp_path):
    """The report's GROUP BY (a UTC day is spelled differently by each database) over jobs the store completed."""
    migrate(db_url, lock_dir=tmp_path)
    store = JobStore(db_url)
    try:
        finished = []
        for tenant, model, day, seconds in (("a", "m1", 1, 2.0), ("a", "m2", 1, 3.0), ("b", "m1", 2, 5.0)):
            at = dt.datetime(2026, 11, day, 23, 30, tzinfo=dt.UTC)
            with clock.frozen(at):
                request = GenerationRequest(prompt="p", seed=1, width=64, height=64, steps=1, model=model)
                job, _ = store.create(request, tenant=tenant)
                (claimed,) = store.claim_batch("w", 30.0)
                store.start(claimed.id, "w")
                result = {"timings": {"worker_total_s": seconds}}
                assert store.complete(claimed.id, "w", [], result, cost=seconds / 100)
            finished.append(job.id)
        start, end = dt.datetime(2026, 11, 1, tzinfo=dt.UTC), dt.datetime(2026, 11, 3, tzinfo=dt.UTC)
        days = usage_report(store.engine, start, end, "day", None)
        assert [(r.key, r.jobs, r.device_seconds, r.cost) for r in days] == [
            ("2026-11-01", 2, 5.0, 0.05),
            ("2026-11-02", 1, 5.0, 0.05),
        ]
        models = usage_report(store.engine, start, end, "model", "a")
        assert [(r.key, r.jobs, r.images) for r in models] == [("m1", 1, 1), ("m2", 1, 1)]
        tenants = usage_report(store.engine, start, dt.datetime(2026, 11, 2, tzinfo=dt.UTC), "tenant", None)
        assert [(r.key, r.jobs) for r in tenants] == [("a", 2)]  # `to` is exclusive
    finally:
        store.close()


def test_jobs_of_one_tensor_batch_share_its_device_time_by_images():
    assert batch_share({"batch_images": 8}, 2) == 0.25
    assert batch_share({"batch_images": 1}, 1) == 1.0
    assert batch_share({}, 3) == 1.0  # ran alone
    assert batch_share({"batch_images": 2}, 4) == 1.0  # never more than the job's own time
