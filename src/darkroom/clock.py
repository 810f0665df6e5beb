"""Time, randomness and ids come from here, so tests can control them in one place."""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import overload

MAX_SEED = 2**32 - 1
_frozen: dt.datetime | None = None


def utcnow() -> dt.datetime:
    return _frozen or dt.datetime.now(dt.UTC)


@overload
def aware(value: dt.datetime) -> dt.datetime: ...
@overload
def aware(value: None) -> None: ...
def aware(value: dt.datetime | None) -> dt.datetime | None:
    """A timestamp read back from the database, in UTC: SQLite hands back naive datetimes, PostgreSQL aware ones."""
    return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value


@contextlib.contextmanager
def frozen(at: dt.datetime) -> Iterator[None]:
    """Tests: wall-clock time stands at `at` (every thread) until the block ends. Monotonic time runs on."""
    global _frozen
    previous, _frozen = _frozen, at
    try:
        yield
    finally:
        _frozen = previous


def monotonic() -> float:
    return time.monotonic()


def new_id(prefix: str) -> str:
    """Ids sort by creation time (uuid7) so listings and logs read in order."""
    return f"{prefix}_{uuid.uuid7().hex}" if hasattr(uuid, "uuid7") else f"{prefix}_{_uuid7_hex()}"


def _uuid7_hex() -> str:
    ms = time.time_ns() // 1_000_000
    rand = secrets.randbits(74)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
    return f"{value:032x}"


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)
