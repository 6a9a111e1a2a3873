"""Counts already let through but not yet written to the store (write-behind).

Recipients are checked locally during a transaction; their counts wait here until the
milter's one-second tick writes them all in one store call (as forced takes). One store
round trip per message instead of one per recipient, and none of it on the MTA's path.
"""
from __future__ import annotations

import threading

from milters.core.store import Take

UNBOUNDED = 1e18  # a burst no count reaches: forced takes record what was already let through


class PendingCounts:
    """Bucket key -> (final drain rate, count); thread-safe."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def add(self, counts: dict[str, tuple[float, float]]) -> None:
        with self._lock:
            for key, (rate, count) in counts.items():
                self._counts[key] = (rate, self._counts.get(key, (rate, 0.0))[1] + count)

    def count(self, key: str) -> float:
        with self._lock:
            return self._counts.get(key, (0.0, 0.0))[1]

    def take(self) -> list[Take]:
        """Everything pending, as forced takes, and forget it (put_back() if unwritten)."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return [Take(key, rate, UNBOUNDED, count, force=True)
                for key, (rate, count) in counts.items()]

    def put_back(self, takes: list[Take]) -> None:
        """Return takes that could not be written (the store was down)."""
        self.add({take.key: (take.rate, take.cost) for take in takes if take.force})
