"""Small durable settings every process shares: the A1111-chosen default model, the webhook dispatcher's cursor.

They live in the database (`settings_kv`), not in a file in the data dir: API nodes behind a load balancer share the
database but not necessarily a folder, and a write here is one transaction like everything else in the job store.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from darkroom import clock
from darkroom.jobs.db import read_tx, write_tx
from darkroom.webhooks.tables import settings_kv

DEFAULT_MODEL = "default_model"


class SettingsKV:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def get(self, key: str, default: Any = None) -> Any:
        with read_tx(self.engine) as conn:
            row = conn.execute(sa.select(settings_kv.c.value).where(settings_kv.c.key == key)).first()
        return default if row is None else row.value

    def set(self, key: str, value: Any) -> None:
        """Upsert, portable: update, and insert when nothing was there (the write lock makes it race-free)."""
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            updated = conn.execute(
                settings_kv.update().where(settings_kv.c.key == key).values(value=value, updated_at=now)
            ).rowcount
            if not updated:
                conn.execute(settings_kv.insert().values(key=key, value=value, updated_at=now))
