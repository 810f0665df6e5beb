"""A small time-bounded cache for the auth hot path (keys, tenant policies, whether any key exists).

Why not cache forever: other processes change keys and policies too. Their changes reach this process through
`auth.invalidation` on PostgreSQL; the TTL bounds how stale an entry can be when a notice is lost, and on SQLite,
which cannot notify. Entries are whole immutable values, and a dict's get and set are atomic, so request threads
share it without a lock. One race matters: a reader that fetched a row just before a change must not put the old
row back after the change dropped it, so `put` takes the `generation` read before the fetch and is ignored when
anything was forgotten since."""

from __future__ import annotations

from typing import Generic, TypeVar

from darkroom import clock

K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, V]] = {}
        self.generation = 0

    def get(self, key: K) -> V | None:
        """The cached value, or None when there is none or it is older than the TTL."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, value = entry
        if clock.monotonic() - stored_at >= self.ttl:
            self._entries.pop(key, None)
            return None
        return value

    def put(self, key: K, value: V, generation: int | None = None) -> V:
        """Cache `value`, unless an entry was forgotten after `generation` (read before the value was fetched)."""
        if self.ttl <= 0 or (generation is not None and generation != self.generation):
            return value
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # a flood of distinct keys: start over rather than grow without bound
        self._entries[key] = (clock.monotonic(), value)
        return value

    def forget(self, key: K) -> None:
        self.generation += 1
        self._entries.pop(key, None)

    def forget_all(self) -> None:
        self.generation += 1
        self._entries.clear()
