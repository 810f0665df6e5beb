"""A small LRU cache for loaded pipelines.

A worker keeps the last few models it ran in memory because loading one takes seconds to minutes; the capacity bounds
memory. When an entry leaves, `on_evict` runs so the owner can drop what it holds of it; then, once the cache's own
references are gone too, `release` runs (by default `release_memory`: reference cycles inside a pipeline keep its
tensors alive until `gc.collect()`, and CUDA blocks go back to the driver only on `empty_cache()`).
"""

from __future__ import annotations

import gc
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from darkroom.observability import metrics

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    def __init__(
        self,
        capacity: int,
        on_evict: Callable[[K, V], None] | None = None,
        release: Callable[[], None] | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        """`capacity`: most entries; `budget_bytes`: most bytes, counting each entry at the size given to `put`."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.budget_bytes = budget_bytes
        self.on_evict = on_evict
        self.release = release if release is not None else release_memory
        self._items: OrderedDict[K, V] = OrderedDict()
        self._sizes: dict[K, int] = {}
        self._lock = threading.RLock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def _over(self, incoming: int, extra_slot: int) -> bool:
        if len(self._items) + extra_slot > self.capacity:
            return True
        return self.budget_bytes is not None and self.used_bytes + incoming > self.budget_bytes

    def get(self, key: K) -> V | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: K, value: V, size_bytes: int = 0) -> None:
        """Adds or refreshes an entry; beyond capacity or budget the least recently used *other* entries leave
        (an entry larger than the whole budget stays alone rather than not at all)."""
        with self._lock:
            self._items[key] = value
            metrics.model_cache_changed(size_bytes - self._sizes.get(key, 0))
            self._sizes[key] = size_bytes
            self._items.move_to_end(key)
            evicted = 0
            while len(self._items) > 1 and self._over(0, 0):
                evicted += self._evict_oldest()
        if evicted:
            self.release()

    def make_room(self, incoming_bytes: int = 0) -> None:
        """Free a slot (and `incoming_bytes` of budget) ahead of a load, so old models are gone before the new one
        claims memory."""
        with self._lock:
            evicted = 0
            while self._items and self._over(incoming_bytes, 1):
                evicted += self._evict_oldest()
        if evicted:
            self.release()

    def evict(self, key: K) -> bool:
        with self._lock:
            if key not in self._items:
                return False
            value = self._items.pop(key)
            metrics.model_cache_changed(-self._sizes.pop(key, 0))
        self._notify(key, value)
        del value
        self.release()
        return True

    def clear(self) -> None:
        with self._lock:
            items = list(self._items.items())
            self._items.clear()
            metrics.model_cache_changed(-sum(self._sizes.values()))
            self._sizes.clear()
        while items:
            self._notify(*items.pop())
        self.release()

    def keys(self) -> list[K]:
        """Least recently used first."""
        with self._lock:
            return list(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _evict_oldest(self) -> int:
        """Returns 1 so callers can count; `release` runs in the caller, after this frame drops its reference."""
        key, value = self._items.popitem(last=False)
        metrics.model_cache_changed(-self._sizes.pop(key, 0))
        self._notify(key, value)
        return 1

    def _notify(self, key: K, value: V) -> None:
        if self.on_evict is not None:
            self.on_evict(key, value)


def release_memory() -> None:
    """Return freed tensors to the system. torch is only consulted if this process already imported it."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
