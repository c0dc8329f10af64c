"""A small, bounded least-recently-used cache (prompt embeddings, so a T5 is not reloaded to re-encode)."""
from __future__ import annotations

import collections
import threading
from typing import Any, Hashable


class LRUCache:
    """At most `max_items` entries; the least recently used one is dropped first."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
