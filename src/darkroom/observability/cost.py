"""Cost: what device time and storage cost at the operator's prices, per job and summed into usage reports.

Each succeeded job records its device-seconds (`gpu_seconds`: the worker's wall time for it) and `cost`: its share of
that time (`batch_share`: a tensor batch's time is split by images) at its worker class's price per device-hour
(`observability.worker_class`, default `gpu` on a CUDA/MPS device, else `cpu`; `observability.device_hour_prices`).
The price is applied once, when the job completes (in the completion's own UPDATE), so a later price change does not
rewrite history. Reports sum those rows (`usage_report`); stored bytes are priced per GB-month at report time
(`storage_gb_month_price`), since they keep costing while they are kept. `estimate` is the TCO helper behind
`darkroom cost estimate`."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any, Literal

import sqlalchemy as sa

from darkroom.config import Settings
from darkroom.jobs.tables import images, jobs

GroupBy = Literal["day", "model", "tenant"]
GB = 1_000_000_000
DAYS_PER_MONTH = 30.44  # an average month, as cloud price sheets count it


def worker_class(settings: Settings, device: str | None) -> str:
    """The price class of a worker on `device`: the configured one, else `gpu` for an accelerator, else `cpu`."""
    if settings.observability.worker_class:
        return settings.observability.worker_class
    return "gpu" if device and device.split(":")[0] in ("cuda", "mps", "xpu") else "cpu"


def device_cost(settings: Settings, device: str | None, seconds: float) -> float:
    """`seconds` of device time at the worker class's price per device-hour (0 for a class with no price)."""
    price = settings.observability.device_hour_prices.get(worker_class(settings, device), 0.0)
    return round(max(0.0, seconds) * price / 3600.0, 8)


def batch_share(timings: dict[str, Any], images: int) -> float:
    """The part of a run's device time that is this job's: its images over the tensor batch's (`batch_images`, set
    by the engine when jobs ran as one batch). Jobs of one batch overlap in wall time, so charging each its whole
    time would bill the device N times over."""
    together = int(timings.get("batch_images") or 0)
    return images / together if together > images > 0 else 1.0


@dataclass(frozen=True)
class UsageRow:
    key: str  # the day (YYYY-MM-DD), model or tenant
    jobs: int
    images: int
    device_seconds: float
    cost: float


def usage_report(
    engine: sa.Engine, start: dt.datetime, end: dt.datetime, group_by: GroupBy, tenant: str | None
) -> list[UsageRow]:
    """Succeeded jobs finished in [start, end), grouped: sums of the job rows themselves (one indexed-range read of
    an operator's report, never on a request's hot path). `tenant` None: every tenant."""
    key = _group_key(engine, group_by)
    query = (
        sa.select(
            key.label("key"),
            sa.func.count().label("jobs"),
            sa.func.coalesce(sa.func.sum(jobs.c.images_requested), 0).label("images"),
            sa.func.coalesce(sa.func.sum(jobs.c.gpu_seconds), 0.0).label("device_seconds"),
            sa.func.coalesce(sa.func.sum(jobs.c.cost), 0.0).label("cost"),
        )
        .where(jobs.c.state == "succeeded", jobs.c.finished_at >= start, jobs.c.finished_at < end)
        .group_by(key)
        .order_by(key)
    )
    if tenant is not None:
        query = query.where(jobs.c.tenant == tenant)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        UsageRow(str(r.key), int(r.jobs), int(r.images), round(float(r.device_seconds), 4), round(float(r.cost), 8))
        for r in rows
    ]


def _group_key(engine: sa.Engine, group_by: GroupBy) -> sa.ColumnElement[Any]:
    if group_by == "model":
        return sa.func.coalesce(jobs.c.model, "default")
    if group_by == "tenant":
        return jobs.c.tenant
    if engine.dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", jobs.c.finished_at), "YYYY-MM-DD")
    return sa.func.strftime("%Y-%m-%d", jobs.c.finished_at)


def stored_bytes(engine: sa.Engine, tenant: str | None) -> int:
    """Image bytes still kept (retention has not deleted them)."""
    query = sa.select(sa.func.coalesce(sa.func.sum(images.c.size_bytes), 0)).where(images.c.deleted_at.is_(None))
    if tenant is not None:
        query = query.where(images.c.tenant == tenant)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def report(
    settings: Settings,
    engine: sa.Engine,
    start: dt.datetime,
    end: dt.datetime,
    group_by: GroupBy,
    tenant: str | None,
) -> dict[str, Any]:
    """`GET /v1/usage?from&to&group_by` and `darkroom usage`: rows, their totals, and storage at its monthly price."""
    rows = usage_report(engine, start, end, group_by, tenant)
    kept = stored_bytes(engine, tenant)
    obs = settings.observability
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "group_by": group_by,
        "tenant": tenant,
        "currency": obs.currency,
        "rows": [asdict(r) for r in rows],
        "total": {
            "jobs": sum(r.jobs for r in rows),
            "images": sum(r.images for r in rows),
            "device_seconds": round(sum(r.device_seconds for r in rows), 4),
            "cost": round(sum(r.cost for r in rows), 8),
        },
        "storage": {
            "bytes": kept,
            "gb_month_price": obs.storage_gb_month_price,
            "cost_per_month": round(kept / GB * obs.storage_gb_month_price, 8),
        },
        "prices": {"device_hour": dict(obs.device_hour_prices)},
    }


def estimate(
    images_per_day: float,
    seconds_per_image: float,
    gpu_hour_price: float,
    cloud_price_per_image: float,
    utilisation: float = 1.0,
) -> dict[str, float]:
    """Monthly cost of generating `images_per_day` on rented/owned GPUs priced by the hour (busy `utilisation` of
    the time paid for: 1.0 pays only for the seconds used, lower means idle hours paid too) against a per-image
    cloud API. GPUs needed is the busy time spread over a day, rounded up."""
    if utilisation <= 0 or utilisation > 1:
        raise ValueError("utilisation must be in (0, 1]")
    images_month = images_per_day * DAYS_PER_MONTH
    busy_hours = images_month * seconds_per_image / 3600.0
    paid_hours = busy_hours / utilisation
    self_hosted = paid_hours * gpu_hour_price
    cloud = images_month * cloud_price_per_image
    gpus = -(-images_per_day * seconds_per_image // (86400 * utilisation)) if images_per_day else 0
    return {
        "images_per_month": round(images_month, 2),
        "gpu_hours_per_month": round(paid_hours, 2),
        "gpus_needed": int(gpus),
        "self_hosted_per_month": round(self_hosted, 2),
        "cloud_per_month": round(cloud, 2),
        "self_hosted_per_image": round(self_hosted / images_month, 6) if images_month else 0.0,
        "savings_per_month": round(cloud - self_hosted, 2),
    }
