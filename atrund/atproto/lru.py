"""A bounded map that forgets the least recently used entry first: every cache of things remote
parties choose (DIDs, handles, signing keys) is one, so no caller can grow the runner's memory."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"an LRU cache holds at least 1 entry, not {size}")
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The entry for ``key`` (now the most recently used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> K | None:
        """Store ``value`` as the most recently used; the key this pushed out, if the cache was full."""
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.size:
            return self._items.popitem(last=False)[0]
        return None

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
