"""In-process store: tests, `mailmoat scan`, and the local fallback for Redis."""
from __future__ import annotations

import threading
import time

from .base import (
    Admission,
    BucketResult,
    Record,
    Store,
    Take,
    Update,
    check_bucket_args,
    check_points_args,
    decide_admission,
    decide_bucket,
    decide_counter,
    decide_points,
    is_forgotten,
    live_row,
)

# Sweep expired records after at least this many writes (and at least as
# many writes as there are records, so sweeping stays O(1) per write on
# average) rather than on every call.
PURGE_EVERY = 1000


class MemoryStore(Store):
    """A dict under one lock: pymilter runs one thread per SMTP connection."""

    def __init__(self, purge_every: int = PURGE_EVERY) -> None:
        # key -> (value, updated, expires or None for never)
        self._data: dict[str, tuple[float, float, float | None]] = {}
        self._lock = threading.Lock()
        self._purge_every = purge_every
        self._writes = 0

    def bucket_take(
        self, key: str, *, cost: float, rate: float, capacity: float, now: float
    ) -> BucketResult:
        check_bucket_args(cost, rate, capacity)
        with self._lock:
            result, update = decide_bucket(
                self._load(key, now), cost=cost, rate=rate, capacity=capacity, now=now
            )
            self._apply(key, update, now)
        return result

    def points_add(self, key: str, amount: float, *, half_life: float, now: float) -> float:
        check_points_args(half_life)
        with self._lock:
            value, update = decide_points(self._value(key), amount, half_life=half_life, now=now)
            self._apply(key, update, now)
        return value

    def counters_add(self, keys: list[str], amount: float, *, keep: float,
                     now: float) -> list[float]:
        values = []
        with self._lock:
            for key in keys:
                value, update = decide_counter(self._load(key, now), amount, keep=keep, now=now)
                self._apply(key, update, now)
                values.append(value)
        return values

    def admit(self, points_key: str | None, takes: list[Take], *, half_life: float,
              halve_every: float, refuse_at: float | None, now: float) -> Admission:
        check_points_args(half_life)
        for take in takes:
            check_bucket_args(take.cost, take.rate, take.burst)
        with self._lock:
            admission, updates = decide_admission(
                self._value(points_key) if points_key else None,
                [self._load(take.key, now) for take in takes], takes, half_life=half_life,
                halve_every=halve_every, refuse_at=refuse_at, now=now)
            for take, update in zip(takes, updates):
                self._apply(take.key, update, now)
        return admission

    def records(self, prefix: str, *, now: float | None = None) -> list[Record]:
        at = time.time() if now is None else now
        with self._lock:
            found = [
                Record(key, value, updated)
                for key, (value, updated, expires) in self._data.items()
                if key.startswith(prefix) and not is_forgotten(expires, at)
            ]
        return sorted(found, key=lambda r: r.key)

    def delete(self, prefix: str) -> int:
        with self._lock:
            doomed = [key for key in self._data if key.startswith(prefix)]
            for key in doomed:
                del self._data[key]
        return len(doomed)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        """How many records are held, expired or not (for tests)."""
        with self._lock:
            return len(self._data)

    # -- internals (caller holds the lock) --------------------------------

    def _load(self, key: str, now: float) -> tuple[float, float] | None:
        """A bucket or counter: absent once expired."""
        return live_row(self._data.get(key), now)

    def _value(self, key: str) -> tuple[float, float] | None:
        """A points score, expired or not: it decays to nothing by itself."""
        row = self._data.get(key)
        return None if row is None else (row[0], row[1])

    def _apply(self, key: str, update: Update, now: float) -> None:
        if update.delete:
            self._data.pop(key, None)
        elif update.write:
            self._data[key] = (update.value, update.updated, update.expires)
            self._writes += 1
            if self._writes >= max(self._purge_every, len(self._data)):
                self._writes = 0
                self._purge(now)

    def purge(self, now: float) -> int:
        """Delete records forgotten at `now` (base.is_forgotten); return how many."""
        with self._lock:
            return self._purge(now)

    def _purge(self, now: float) -> int:
        dead = [k for k, (_, _, exp) in self._data.items() if is_forgotten(exp, now)]
        for key in dead:
            del self._data[key]
        return len(dead)
