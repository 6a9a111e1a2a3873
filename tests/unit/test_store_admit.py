"""Store.admit, the one-round-trip rate-limit decision, under the same contract for every
backend; and the SQLite connection pool that libmilter's thread-per-session needs."""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milters.core.store import Admission, MemoryStore, SqliteStore, Store, Take, open_store
from milters.core.store.base import POINTS_EPSILON
from milters.core.store.sqlite import POOL_SIZE
from tests.harness.redis_server import RedisServer
from tests.unit.test_store_contract import T0, _open

BACKENDS = ["memory", "sqlite", "redis", "fallback"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = _open(request.param, request, tmp_path)
    yield s
    s.close()


def admit(s: Store, takes: list[Take], at: float = T0, refuse_at: float | None = None,
          points_key: str | None = "p:ip") -> Admission:
    return s.admit(points_key, takes, half_life=100.0, halve_every=10.0, refuse_at=refuse_at,
                   now=at)


def test_all_or_nothing(store: Store) -> None:
    wide, narrow = Take("b:wide", 1.0, 10), Take("b:narrow", 0.001, 2)
    assert admit(store, [wide, narrow]).allowed
    assert admit(store, [wide, narrow]).allowed
    third = admit(store, [wide, narrow])
    assert not third.allowed and third.first_denied() == 1
    # The denial counted nothing, not even in the bucket that had room.
    assert store.bucket_take("b:wide", cost=0, rate=1.0, capacity=10, now=T0).level == 2


def test_points_slow_the_rate_and_shrink_the_burst(store: Store) -> None:
    store.points_add("p:ip", 20, half_life=100.0, now=T0)  # two halvings: a quarter
    result = admit(store, [Take("b:x", 4.0, 8)])
    assert result.points == pytest.approx(20)
    assert result.slowdown == pytest.approx(0.25)
    assert result.results[0].capacity == 2  # 8 * 0.25
    assert admit(store, [Take("b:x", 4.0, 8)]).allowed
    denied = admit(store, [Take("b:x", 4.0, 8)])
    assert not denied.allowed
    assert denied.results[0].retry_after == pytest.approx(1.0)  # 1 excess / (4 * 0.25)


def test_refuse_at_counts_nothing(store: Store) -> None:
    store.points_add("p:ip", 50, half_life=100.0, now=T0)
    refused = admit(store, [Take("b:y", 1.0, 10)], refuse_at=40)
    assert refused.refused and not refused.allowed
    assert store.bucket_take("b:y", cost=0, rate=1.0, capacity=10, now=T0).level == 0
    later = admit(store, [Take("b:y", 1.0, 10)], at=T0 + 100, refuse_at=40)  # 25 points
    assert not later.refused and later.allowed


def test_no_points_key_and_no_takes(store: Store) -> None:
    assert admit(store, [], points_key=None) == Admission(0.0, 1.0, ())
    store.points_add("p:ip", 10, half_life=100.0, now=T0)
    only_points = admit(store, [])
    assert only_points.points == pytest.approx(10) and only_points.allowed


def test_points_earned_after_a_burst_slow_its_drain_even_after_a_purge(store: Store) -> None:
    """A client fills its bucket at full speed, then earns points: the rest drains at the
    slower rate, and the record is not forgotten (nor purged) at the full-speed drain time."""
    takes = [Take("b:burst", 1.0, 4)]
    for _ in range(4):
        assert admit(store, takes).allowed
    store.points_add("p:ip", 20, half_life=100.0, now=T0)
    later = T0 + 5  # at the full rate, the four would have drained at T0 + 4
    assert [r.key for r in store.records("b:", now=later)] == ["b:burst"]
    purge = getattr(store, "purge", None)  # memory and SQLite sweep; Redis expires by itself
    if purge is not None:
        purge(later)
    slow = 0.5 ** (20 * 0.5 ** (5 / 100) / 10)
    denied = admit(store, takes, at=later)
    assert not denied.allowed
    assert denied.results[0].level == pytest.approx(4 - 5 * slow)


def test_points_at_the_threshold_still_count(store: Store) -> None:
    """Exactly POINTS_EPSILON is worth something at the instant it is written, whatever the
    wall clock does meanwhile (Redis once expired it 1 ms later, on its own clock)."""
    store.points_add("p:ip", POINTS_EPSILON, half_life=100.0, now=T0)
    time.sleep(0.01)
    assert admit(store, []).points == pytest.approx(POINTS_EPSILON)


steps = st.lists(st.tuples(st.floats(0, 30), st.floats(0, 15), st.integers(0, 3)),
                 min_size=1, max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps)
def test_every_backend_agrees_with_memory(store: Store, sequence: list) -> None:  # type: ignore[type-arg]
    """Random time steps, point additions and takes: the same decisions everywhere."""
    reference = MemoryStore()
    prefix = f"h{uuid.uuid4().hex}:"  # the store outlives one example; the reference does not
    at = T0
    for dt, points, burst in sequence:
        at += dt
        takes = [Take(prefix + "a", 0.5, burst + 1), Take(prefix + "b", 0.2, 3)]
        for s in (store, reference):
            s.points_add(prefix + "p", points, half_life=100.0, now=at)
        got = store.admit(prefix + "p", takes, half_life=100.0, halve_every=10.0,
                          refuse_at=40.0, now=at)
        want = reference.admit(prefix + "p", takes, half_life=100.0, halve_every=10.0,
                               refuse_at=40.0, now=at)
        assert got.refused == want.refused and got.allowed == want.allowed
        assert got.points == pytest.approx(want.points, rel=1e-9, abs=1e-9)
        for g, w in zip(got.results, want.results):
            assert (g.allowed, g.capacity) == (w.allowed, w.capacity)
            assert g.level == pytest.approx(w.level, rel=1e-9, abs=1e-9)


def test_redis_admit_is_one_round_trip(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url)
    store.delete("")
    import redis
    client = redis.Redis.from_url(redis_server.url)
    client.config_resetstat()
    store.admit("p:ip", [Take("b:1", 1, 5), Take("b:2", 1, 5), Take("b:3", 1, 5)],
                half_life=100.0, halve_every=10.0, refuse_at=None, now=T0)
    calls = client.info("commandstats")
    scripts = sum(v["calls"] for k, v in calls.items() if k.startswith("cmdstat_eval"))
    assert scripts == 1
    store.close()


def test_sqlite_keeps_a_bounded_pool_across_many_threads(tmp_path: Path) -> None:
    """libmilter runs every SMTP session in a new thread: connections must be reused."""
    store = SqliteStore(str(tmp_path / "state.db"))

    def session(i: int) -> None:
        store.admit(f"p:{i}", [Take(f"b:{i}", 1, 5)], half_life=100.0, halve_every=10.0,
                    refuse_at=None, now=T0)

    for batch in range(20):  # 200 short-lived threads, 10 at a time
        threads = [threading.Thread(target=session, args=(batch * 10 + i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert len(store._conns) <= POOL_SIZE
    assert len(store.records("b:", now=T0)) == 200
    store.close()


def test_forced_takes_are_counted_whatever_the_verdict(store: Store) -> None:
    store.points_add("p:ip", 50, half_life=100.0, now=T0)
    forced = Take("b:other-client", 2.0, 1.0, 7.0, force=True)  # over its burst: still counted
    refused = admit(store, [Take("b:z", 1.0, 10), forced], refuse_at=40)
    assert refused.refused and refused.results[1].allowed
    peek = store.bucket_take("b:other-client", cost=0, rate=2.0, capacity=100, now=T0 + 1)
    assert peek.level == pytest.approx(5.0)  # 7 counted, drained at its own final rate 2/s
    assert store.bucket_take("b:z", cost=0, rate=1.0, capacity=10, now=T0).level == 0
