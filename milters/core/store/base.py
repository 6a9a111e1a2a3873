"""The Store interface and the decay math every Python backend shares.

Value types are NamedTuples: a decision builds several per call, and frozen dataclasses
cost three times as much to create.

Three kinds of record live in a store, each as (value, updated, expires):

- a leaky bucket: the level drains linearly at `rate` units per second;
- a points score: the value halves every `half_life` seconds;
- a plain counter, kept `keep` seconds after its last count.

A bucket or counter past its `expires` is absent to every read, whether or not the
backend has purged it yet: purging (a sweep in memory and SQLite, PEXPIRE in Redis) is
housekeeping and never changes a decision. A points score expires when it has decayed
below POINTS_EPSILON, so reading it past that time gives nothing either.

The caller always passes `now`, so tests drive a controlled clock and
several gateways sharing one Redis agree on what "now" means per call.
The Redis backend repeats these formulas in Lua; the contract tests prove
that both give the same numbers.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

from milters.core.errors import StoreError

# A points value below this counts as zero, so decayed scores can be forgotten.
POINTS_EPSILON = 0.01
# A bucket counted by `admit` drains at its rate times the slowdown of the points read then,
# and points earned after the write slow it further. Its record lasts until it would have
# drained at this share of its full rate (six halvings: a policy's tempfail_at normally
# refuses the client before that), so a client that fills its bucket and then earns points
# waits out the slower drain instead of finding the record forgotten.
SLOWEST_DRAIN = 1 / 64


class BucketResult(NamedTuple):
    """The outcome of one `Store.bucket_take`."""

    allowed: bool  # True if the cost fitted and was added
    level: float  # level after this call (drained, plus cost if allowed)
    capacity: float
    retry_after: float  # seconds until `cost` would fit (0.0 when allowed)


class Record(NamedTuple):
    """One stored record, as `mailmoat ratelimit show` lists it."""

    key: str
    value: float  # stored value as of `updated` (not decayed)
    updated: float  # unix time of the last write


class Update(NamedTuple):
    """What a backend must do after `decide_bucket` / `decide_points`.

    `write` False means leave the record as it is (a denial, a peek or a
    points read), so those calls stay read-only. `delete` means the record
    is worth nothing any more. `expires` None means the record never expires.
    """

    write: bool
    value: float
    updated: float
    expires: float | None
    delete: bool = False


def check_bucket_args(cost: float, rate: float, capacity: float) -> None:
    """Reject arguments that would make the math meaningless."""
    if not (cost >= 0 and rate >= 0 and capacity >= 0):
        raise ValueError(f"bucket needs cost, rate, capacity >= 0 (got {cost}, {rate}, {capacity})")


def check_points_args(half_life: float) -> None:
    if not half_life > 0:
        raise ValueError(f"points need half_life > 0 (got {half_life})")


def drained_level(level: float, updated: float, rate: float, now: float) -> float:
    """The bucket level at `now`. A clock behind `updated` drains nothing."""
    elapsed = max(0.0, now - updated)
    return max(0.0, level - rate * elapsed)


def retry_after(drained: float, cost: float, capacity: float, rate: float) -> float:
    """Seconds until `cost` fits into a bucket at level `drained`."""
    excess = drained + cost - capacity
    if excess <= 0:
        return 0.0
    if rate <= 0 or cost > capacity:
        return math.inf  # it will never fit
    return excess / rate


def decide_bucket(
    stored: tuple[float, float] | None,
    *,
    cost: float,
    rate: float,
    capacity: float,
    now: float,
    expiry_rate: float | None = None,
) -> tuple[BucketResult, Update]:
    """Leaky-bucket step for a record `stored` = (level, updated) or None. A written record
    expires once drained at `expiry_rate` (default: `rate`)."""
    # Hot path (several calls per message): arithmetic inline, no helper calls.
    if stored is None:
        drained, updated = 0.0, now
    else:
        level, updated = stored
        drained = level - rate * (now - updated) if now > updated else level
        if drained < 0.0:
            drained = 0.0
    # Never move `updated` backwards: a gateway whose clock lags must not
    # let the next caller drain the same interval twice.
    stamp = now if now > updated else updated
    new = drained + cost
    if new <= capacity:
        result = BucketResult(True, new, capacity, 0.0)
        if cost > 0:
            lasts = rate if expiry_rate is None else expiry_rate
            expires = stamp + new / lasts if lasts > 0 else None
            return result, Update(True, new, stamp, expires)
        return result, Update(False, new, stamp, None)
    result = BucketResult(False, drained, capacity, retry_after(drained, cost, capacity, rate))
    return result, Update(False, drained, stamp, None)


def decayed_points(value: float, updated: float, half_life: float, now: float) -> float:
    """A points value at `now`; below POINTS_EPSILON it is zero."""
    elapsed = max(0.0, now - updated)
    decayed = value * 0.5 ** (elapsed / half_life)
    return decayed if decayed >= POINTS_EPSILON else 0.0


def points_expiry(value: float, half_life: float, at: float) -> float:
    """When a value written at `at` decays below POINTS_EPSILON."""
    if value < POINTS_EPSILON:
        return at
    return at + half_life * math.log2(value / POINTS_EPSILON)


def decide_points(
    stored: tuple[float, float] | None,
    amount: float,
    *,
    half_life: float,
    now: float,
) -> tuple[float, Update]:
    """Decaying-score step for a record `stored` = (value, updated) or None."""
    amount, half_life, now = float(amount), float(half_life), float(now)
    value, updated = stored if stored is not None else (0.0, now)
    elapsed = max(0.0, now - updated)
    new = value * 0.5 ** (elapsed / half_life) + amount
    if new < POINTS_EPSILON:
        new = 0.0
    if amount == 0:
        return new, Update(False, new, updated, None)
    stamp = max(now, updated)
    if new == 0.0:
        return new, Update(False, 0.0, stamp, None, delete=stored is not None)
    return new, Update(True, new, stamp, points_expiry(new, half_life, stamp))


def decide_counter(stored: tuple[float, float] | None, amount: float, *, keep: float,
                   now: float) -> tuple[float, Update]:
    """Plain counter step (no decay): add `amount`; the record lives `keep` seconds past
    its last count, and a count after that starts again from zero (whether or not the
    backend has purged the record yet: purging is housekeeping, not meaning)."""
    now, keep = float(now), float(keep)
    alive = stored is not None and now < stored[1] + keep
    value = (stored[0] if alive else 0.0) + float(amount)
    return value, Update(True, value, now, now + keep)


class Take(NamedTuple):
    """One bucket an admission must fit into, at its full-speed rate and burst.

    A forced take records events that were already let through (counted locally and
    written later): it is always counted, whatever the verdict, never denies, and its rate
    is final (it belongs to another client than the points of this admission)."""

    key: str
    rate: float
    burst: float
    cost: float = 1.0
    force: bool = False


class Admission(NamedTuple):
    """The outcome of `Store.admit`: the source's points and each bucket's verdict."""

    points: float
    slowdown: float  # the share of the full rate these points leave (1.0 = full speed)
    results: tuple[BucketResult, ...]
    refused: bool = False  # points were at or above `refuse_at`: nothing was counted

    @property
    def allowed(self) -> bool:
        return not self.refused and all(result.allowed for result in self.results)

    def first_denied(self) -> int | None:
        return next((i for i, result in enumerate(self.results) if not result.allowed), None)


def slowdown_factor(points: float, halve_every: float) -> float:
    """Every `halve_every` points halve the rate."""
    return 0.5 ** (max(points, 0.0) / halve_every)


def scaled_capacity(burst: float, slowdown: float) -> float:
    """Whole events, at least one; round half up (the same in Lua: floor(x + 0.5)) so that a
    trace of points does not cost a whole message."""
    return max(1.0, math.floor(burst * slowdown + 0.5))


def decide_admission(
    points_stored: tuple[float, float] | None,
    buckets_stored: list[tuple[float, float] | None],
    takes: list[Take],
    *,
    half_life: float,
    halve_every: float,
    refuse_at: float | None,
    now: float,
) -> tuple[Admission, list[Update]]:
    """All-or-nothing: every take is counted only if every one fits (one update per take);
    forced takes are counted in any case."""
    points = 0.0
    if points_stored is not None:
        points = decayed_points(points_stored[0], points_stored[1], half_life, now)
    slow = slowdown_factor(points, halve_every)
    decided = [decide_bucket(stored, cost=take.cost, rate=take.rate, capacity=math.inf, now=now,
                             expiry_rate=take.rate * SLOWEST_DRAIN)
               if take.force else
               decide_bucket(stored, cost=take.cost, rate=take.rate * slow,
                             capacity=scaled_capacity(take.burst, slow), now=now,
                             expiry_rate=take.rate * SLOWEST_DRAIN)
               for take, stored in zip(takes, buckets_stored)]
    results = tuple(result for result, _ in decided)
    refused = refuse_at is not None and points >= refuse_at
    admission = Admission(points, slow, results, refused)
    if not admission.allowed:
        return admission, [update if take.force else Update(False, 0.0, now, None)
                           for take, (_, update) in zip(takes, decided)]
    return admission, [update for _, update in decided]


def is_forgotten(expires: float | None, now: float) -> bool:
    """Past its expiry: reads treat the record as absent, purging may delete it. Strictly
    past: a tiny cost's expiry can round to its own write time, and is still there then."""
    return expires is not None and expires < now


def live_row(row: tuple[float, float, float | None] | None,
             now: float) -> tuple[float, float] | None:
    """(value, updated) of a stored (value, updated, expires) row, None if absent or
    forgotten."""
    if row is None or is_forgotten(row[2], now):
        return None
    return row[0], row[1]


# The state's format: SQLite's PRAGMA user_version, Redis's `<namespace>.format` key. 0 (no
# mark) is the format of the mailmoat releases before formats were kept, read as format 1:
# the same table and keys. A format above STATE_FORMAT was written by a newer mailmoat.
STATE_FORMAT = 1


def newer_format_error(where: str, found: object) -> StoreError:
    return StoreError(
        f"{where}: state format {found} is newer than this mailmoat knows (up to "
        f"{STATE_FORMAT}): it was written by a newer mailmoat; run that version, or give "
        "this one a state store of its own")


class Store(ABC):
    """Shared state for rate limiting: atomic per key in every backend."""

    # True where a write costs several times a read (SQLite: a write transaction against a
    # plain SELECT): callers may then read at decision time and write counts behind, in
    # batches. Where an atomic read-and-count costs what a read costs (memory: a lock;
    # Redis: one round trip either way), they count exactly at decision time.
    prefers_write_behind: bool = False

    @abstractmethod
    def bucket_take(
        self, key: str, *, cost: float, rate: float, capacity: float, now: float
    ) -> BucketResult:
        """Add `cost` to the leaky bucket `key` if it fits after draining.

        The stored level drains linearly at `rate` per second since the
        record's last write. A denied take leaves the record unchanged and
        reports the drained level and how long until `cost` would fit;
        cost 0 is a peek. The record expires once drained to zero.
        """

    @abstractmethod
    def points_add(self, key: str, amount: float, *, half_life: float, now: float) -> float:
        """Decay the score `key` to `now`, add `amount`, store, return it.

        amount 0 only reads. A result below POINTS_EPSILON counts as 0 and
        the record goes away.
        """

    def counter_add(self, key: str, amount: float, *, keep: float, now: float) -> float:
        """Add `amount` to the plain counter `key` (created at 0), atomically; return the
        new value. The record expires `keep` seconds after this call (for tallies such as
        DMARC aggregate-report rows)."""
        return self.counters_add([key], amount, keep=keep, now=now)[0]

    @abstractmethod
    def counters_add(self, keys: list[str], amount: float, *, keep: float,
                     now: float) -> list[float]:
        """counter_add on every key in one atomic step: no other change falls between them,
        so parallel callers counting the same keys see the same order on each (the console's
        login throttle counts a name and an address together)."""

    @abstractmethod
    def admit(self, points_key: str | None, takes: list[Take], *, half_life: float,
              halve_every: float, refuse_at: float | None, now: float) -> Admission:
        """One rate-limit decision, atomic and in one round trip: read the decayed points
        at `points_key` (0 when None), scale every take's rate and burst by the slowdown
        they cause, and count every take if all fit and the points are below `refuse_at`;
        otherwise count none."""

    @abstractmethod
    def records(self, prefix: str, *, now: float | None = None) -> list[Record]:
        """Every live record whose key starts with `prefix`, sorted by key.

        Liveness is judged at `now` (default: the wall clock).
        """

    @abstractmethod
    def delete(self, prefix: str) -> int:
        """Delete every record whose key starts with `prefix`; return how many."""

    def check_format(self) -> None:
        """Mark or migrate the state's format on first use; StoreError if it is newer than
        STATE_FORMAT. Stores with nothing kept between runs have no format."""
        return None

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
