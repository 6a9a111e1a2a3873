"""Counts already let through but not yet written to the store (write-behind).

Recipients are checked locally during a transaction; their counts wait here and ride along
with the next admission of any session of the process (as forced takes), or the milter's
one-second tick writes them. One store round trip per message instead of one per recipient.
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

    def take(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[Take]:
        """Everything pending, as forced takes; keys in `exclude` (buckets the caller's own
        admission touches) stay pending, so one admission never names a key twice."""
        with self._lock:
            if not self._counts:
                return []
            counts = self._counts
            self._counts = {key: value for key, value in counts.items() if key in exclude}
        return [Take(key, rate, UNBOUNDED, count, force=True)
                for key, (rate, count) in counts.items() if key not in exclude]

    def put_back(self, takes: list[Take]) -> None:
        """Return takes that could not be written (the store was down)."""
        self.add({take.key: (take.rate, take.cost) for take in takes if take.force})
