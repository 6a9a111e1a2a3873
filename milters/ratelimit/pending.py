"""Counts already let through but not yet written to the store (write-behind).

At MAIL FROM and RCPT TO the milter only reads the store; each message and recipient is then
checked here, against the level read plus what this process let through and has not yet
written, and counted here. A writer thread writes whatever has accumulated, in one store
call, as soon as there is something (group commit): the store write is off the MTA's path,
and other gateways sharing the store see the count within one write's time.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

from milters.core.store import Take

UNBOUNDED = 1e18  # a burst no count reaches: forced takes record what was already let through


class Claim(NamedTuple):
    """One event to count in bucket `key` if it fits: `level` as read from the store,
    `capacity` the burst the client's points leave, `rate` the drain rate they leave."""

    key: str
    level: float
    capacity: float
    rate: float


class PendingCounts:
    """Bucket key -> (final drain rate, count), waiting or being written; thread-safe.

    Counts being written stay visible to checks until the write is done: a check that reads
    the store in between counts them twice for a moment (too strict, never too lax)."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[float, float]] = {}
        self._writing: dict[str, tuple[float, float]] = {}
        self._changed = threading.Condition()

    @staticmethod
    def _merge(into: dict[str, tuple[float, float]], counts: dict[str, tuple[float, float]]) -> None:
        for key, (rate, count) in counts.items():
            into[key] = (rate, into.get(key, (rate, 0.0))[1] + count)

    def _held(self, key: str) -> float:
        return self._waiting.get(key, (0.0, 0.0))[1] + self._writing.get(key, (0.0, 0.0))[1]

    def add(self, counts: dict[str, tuple[float, float]]) -> None:
        with self._changed:
            self._merge(self._waiting, counts)
            self._changed.notify()

    def count(self, key: str) -> float:
        with self._changed:
            return self._held(key)

    def reserve(self, claims: list[Claim]) -> tuple[int, float] | None:
        """Count one event in every claim's bucket if each fits, else in none (atomic against
        the other threads of this process). Returns None, or (index, level) of the first
        claim that does not fit, the level counting what this process holds."""
        with self._changed:
            for index, claim in enumerate(claims):
                used = claim.level + self._held(claim.key)
                if used + 1 > claim.capacity:
                    return index, used
            if claims:
                self._merge(self._waiting, {claim.key: (claim.rate, 1.0) for claim in claims})
                self._changed.notify()
            return None

    def take(self) -> list[Take]:
        """What waits, as forced takes, now being written; call done() or put_back() after."""
        with self._changed:
            self._merge(self._writing, self._waiting)
            counts, self._waiting = self._waiting, {}
        return [Take(key, rate, UNBOUNDED, count, force=True)
                for key, (rate, count) in counts.items()]

    def done(self, takes: list[Take]) -> None:
        """These takes are in the store now."""
        with self._changed:
            for take in takes:
                rate, count = self._writing.get(take.key, (take.rate, 0.0))
                if count - take.cost > 1e-9:
                    self._writing[take.key] = (rate, count - take.cost)
                else:
                    self._writing.pop(take.key, None)

    def put_back(self, takes: list[Take]) -> None:
        """These takes could not be written (the store was down): they wait again."""
        self.done(takes)
        self.add({take.key: (take.rate, take.cost) for take in takes if take.force})

    def wait(self, timeout: float) -> bool:
        """Block until something waits to be written (True) or `timeout` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: bool(self._waiting), timeout)

    def wake(self) -> None:
        """Release a wait() (for stopping the writer)."""
        with self._changed:
            self._changed.notify_all()
