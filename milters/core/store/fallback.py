"""A store that falls back to a local one while the primary is unreachable.

DESIGN.md section 8: "Redis unreachable: per policy, tempfail or fall back to
the local SQLite store". This is the fall-back half. After a failure the
primary is left alone for `retry_after` seconds, so a dead Redis costs its
connect timeout once per window instead of on every decision.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from milters.core.errors import StoreUnavailable

from .base import Admission, BucketResult, Record, Store, Take

T = TypeVar("T")


class FallbackStore(Store):
    """Forward to `primary`; serve from `local` while it is unavailable.

    `on_unavailable(reason)` is called once per outage (when the primary
    first fails after working or at start), `on_recovered()` once when it
    answers again. Only StoreUnavailable triggers the fallback: any other
    StoreError is a real fault and propagates.
    """

    def __init__(
        self,
        primary: Store,
        local: Store,
        on_unavailable: Callable[[str], None],
        *,
        retry_after: float = 10.0,
        on_recovered: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.primary = primary
        self.local = local
        self._on_unavailable = on_unavailable
        self._on_recovered = on_recovered
        self._retry_after = retry_after
        self._clock = clock
        self._lock = threading.Lock()
        self._down = False
        self._next_try = 0.0

    @property
    def prefers_write_behind(self) -> bool:  # type: ignore[override]
        return self.primary.prefers_write_behind

    @property
    def degraded(self) -> bool:
        """True while calls are served from the local store."""
        return self._down

    def bucket_take(
        self, key: str, *, cost: float, rate: float, capacity: float, now: float
    ) -> BucketResult:
        return self._route(
            lambda s: s.bucket_take(key, cost=cost, rate=rate, capacity=capacity, now=now)
        )

    def points_add(self, key: str, amount: float, *, half_life: float, now: float) -> float:
        return self._route(lambda s: s.points_add(key, amount, half_life=half_life, now=now))

    def counters_add(self, keys: list[str], amount: float, *, keep: float,
                     now: float) -> list[float]:
        return self._route(lambda s: s.counters_add(keys, amount, keep=keep, now=now))

    def admit(self, points_key: str | None, takes: list[Take], *, half_life: float,
              halve_every: float, refuse_at: float | None, now: float) -> Admission:
        return self._route(lambda s: s.admit(points_key, takes, half_life=half_life,
                                             halve_every=halve_every, refuse_at=refuse_at,
                                             now=now))

    def records(self, prefix: str, *, now: float | None = None) -> list[Record]:
        return self._route(lambda s: s.records(prefix, now=now))

    def delete(self, prefix: str) -> int:
        # Clear both, so a reset also forgets what was counted in an outage.
        removed = self.local.delete(prefix)
        if self._primary_due():
            try:
                removed += self.primary.delete(prefix)
                self._mark_up()
            except StoreUnavailable as exc:
                self._mark_down(str(exc))
        return removed

    def check_format(self) -> None:
        self.local.check_format()
        try:
            self.primary.check_format()
        except StoreUnavailable:
            pass  # down: checked again at the next start

    def ping(self) -> None:
        """Raise only if the local store fails: the primary may be down."""
        self.local.ping()
        if self._primary_due():
            try:
                self.primary.ping()
                self._mark_up()
            except StoreUnavailable as exc:
                self._mark_down(str(exc))

    def close(self) -> None:
        try:
            self.primary.close()
        finally:
            self.local.close()

    # -- internals ------------------------------------------------------------

    def _route(self, call: Callable[[Store], T]) -> T:
        if self._primary_due():
            try:
                result = call(self.primary)
            except StoreUnavailable as exc:
                self._mark_down(str(exc))
            else:
                self._mark_up()
                return result
        return call(self.local)

    def _primary_due(self) -> bool:
        with self._lock:
            if not self._down:
                return True
            now = self._clock()
            if now < self._next_try:
                return False
            # This caller probes; the others stay local meanwhile instead of
            # all waiting out the same timeout.
            self._next_try = now + self._retry_after
            return True

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            first = not self._down
            self._down = True
            self._next_try = self._clock() + self._retry_after
        if first:
            self._on_unavailable(reason)

    def _mark_up(self) -> None:
        with self._lock:
            recovered = self._down
            self._down = False
        if recovered and self._on_recovered is not None:
            self._on_recovered()
