"""One contract for every Store backend, plus what is special to each.

The clock is ours: every call passes `now`, so nothing here waits for time
to pass except the one test of Redis's own expiry. Every loop is bounded.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from milters.core.errors import StoreError, StoreUnavailable
from milters.core.store import (
    BucketResult,
    FallbackStore,
    MemoryStore,
    Record,
    SqliteStore,
    Store,
    open_store,
)
from milters.core.store.redis_store import RedisStore
from tests.harness.redis_server import RedisServer, free_port

T0 = 1_700_000_000.0  # a realistic unix time, so float precision is tested too
HUGE = 1e12
REL = 1e-9



def _open(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "memory":
        return open_store("memory://")
    if kind == "sqlite":
        return open_store(f"sqlite:///{tmp_path}/state.db")
    if kind == "redis":
        store = open_store(request.getfixturevalue("redis_server").url)
        store.delete("")  # the server lives for the session; start clean
        return store
    # The Redis URL names a closed port: the whole contract runs on the fallback.
    dead = open_store(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    return FallbackStore(dead, MemoryStore(), lambda reason: None)


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        "redis",
        "fallback",
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = _open(request.param, request, tmp_path)
    yield s
    s.close()


def take(
    s: Store, key: str, cost: float, at: float, rate: float = 0.5, cap: float = 5
) -> BucketResult:
    return s.bucket_take(key, cost=cost, rate=rate, capacity=cap, now=at)


# -- the contract: leaky bucket --------------------------------------------------


def test_burst_fits_then_next_is_denied_with_retry_after(store: Store) -> None:
    results = [take(store, "ip:a", 1, T0) for _ in range(5)]
    assert [r.allowed for r in results] == [True] * 5
    assert [r.level for r in results] == [1, 2, 3, 4, 5]
    denied = take(store, "ip:a", 1, T0)
    assert denied == BucketResult(False, 5.0, 5.0, 2.0)  # (5 + 1 - 5) / 0.5
    # A denial changes nothing: exactly retry_after later the cost fits.
    assert not take(store, "ip:a", 1, T0 + 1.999).allowed
    assert take(store, "ip:a", 1, T0 + 2.0) == BucketResult(True, 5.0, 5.0, 0.0)


def test_after_level_over_rate_the_bucket_is_empty(store: Store) -> None:
    for _ in range(5):
        take(store, "ip:b", 1, T0)
    assert take(store, "ip:b", 5, T0 + 10.0) == BucketResult(True, 5.0, 5.0, 0.0)


def test_partial_drain_and_peek(store: Store) -> None:
    take(store, "ip:c", 4, T0, rate=1)
    peek = take(store, "ip:c", 0, T0 + 1.5, rate=1)
    assert peek == BucketResult(True, 2.5, 5.0, 0.0)
    denied = take(store, "ip:c", 3, T0 + 1.5, rate=1)
    assert not denied.allowed and denied.level == 2.5
    assert denied.retry_after == pytest.approx(0.5, rel=REL)
    assert take(store, "ip:c", 3, T0 + 2.0, rate=1).level == 5.0


def test_never_fitting_cost_has_infinite_retry_after(store: Store) -> None:
    assert take(store, "ip:d", 6, T0).retry_after == math.inf  # cost > capacity
    take(store, "ip:e", 5, T0, rate=0)
    assert take(store, "ip:e", 1, T0 + 1e6, rate=0).retry_after == math.inf


def test_bad_arguments_are_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        take(store, "ip:f", -1, T0)
    with pytest.raises(ValueError):
        store.points_add("p:f", 1, half_life=0, now=T0)


# -- the contract: decaying points -------------------------------------------------


def test_points_halve_every_half_life(store: Store) -> None:
    assert store.points_add("pts:a", 8, half_life=60, now=T0) == 8
    assert store.points_add("pts:a", 0, half_life=60, now=T0 + 60) == pytest.approx(4, rel=REL)
    assert store.points_add("pts:a", 2, half_life=60, now=T0 + 60) == pytest.approx(6, rel=REL)
    assert store.points_add("pts:a", 0, half_life=60, now=T0 + 180) == pytest.approx(1.5, rel=REL)


def test_points_below_epsilon_count_as_zero(store: Store) -> None:
    assert store.points_add("pts:b", 0, half_life=60, now=T0) == 0
    assert store.records("pts:b", now=T0) == []  # a read writes nothing
    assert store.points_add("pts:b", 0.005, half_life=60, now=T0) == 0
    store.points_add("pts:b", 1, half_life=1, now=T0)
    assert store.points_add("pts:b", 0, half_life=1, now=T0 + 7) == 0  # 1/128 < 0.01


# -- the contract: records, delete, expiry -------------------------------------------


def test_records_and_delete_by_prefix(store: Store) -> None:
    keys = ["ip:10", "ip:2", "ip:1", "ip*x", "ip%_y", "user:ä"]
    for i, key in enumerate(keys):
        take(store, key, i + 1, T0, rate=0, cap=HUGE)
    listed = store.records("ip:", now=T0)
    assert listed == [Record("ip:1", 3.0, T0), Record("ip:10", 1.0, T0), Record("ip:2", 2.0, T0)]
    # Glob and LIKE wildcards in a prefix are plain characters.
    assert [r.key for r in store.records("ip*", now=T0)] == ["ip*x"]
    assert [r.key for r in store.records("ip%", now=T0)] == ["ip%_y"]
    assert [r.key for r in store.records("", now=T0)] == sorted(keys)
    assert store.delete("ip:") == 3
    assert store.delete("ip:") == 0
    assert [r.key for r in store.records("", now=T0)] == ["ip%_y", "ip*x", "user:ä"]


def test_expired_records_are_not_listed(store: Store) -> None:
    take(store, "b:short", 2, T0, rate=1)  # empty at T0 + 2
    take(store, "b:forever", 2, T0, rate=0)
    store.points_add("p:short", 1, half_life=1, now=T0)  # below 0.01 after log2(100) s
    assert [r.key for r in store.records("", now=T0 + 1.5)] == ["b:forever", "b:short", "p:short"]
    assert [r.key for r in store.records("", now=T0 + 6.5)] == ["b:forever", "p:short"]
    assert [r.key for r in store.records("", now=T0 + 6.7)] == ["b:forever"]
    assert [r.key for r in store.records("", now=T0 + 1e9)] == ["b:forever"]


def test_counters_add_without_decay_and_expire_after_keep(store: Store) -> None:
    assert store.counter_add("c:row", 1, keep=100, now=T0) == 1
    assert store.counter_add("c:row", 2.5, keep=100, now=T0 + 50) == 3.5
    # Counted again at T0 + 50: it lives until T0 + 150, whatever the value.
    assert store.records("c:", now=T0 + 149) == [Record("c:row", 3.5, T0 + 50)]
    assert store.records("c:", now=T0 + 151) == []
    # Counting after it expired starts again from zero, even before it was purged.
    assert store.counter_add("c:row", 1, keep=100, now=T0 + 150) == 1
    assert store.delete("c:") in (0, 1)  # Redis may have expired it already


def test_two_threads_never_lose_a_count(store: Store) -> None:
    barrier = threading.Barrier(2, timeout=10)

    def worker() -> None:
        barrier.wait()
        for _ in range(300):
            store.counter_add("c:t", 1, keep=1e6, now=T0)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert store.counter_add("c:t", 0, keep=1e6, now=T0) == 600


def test_counters_of_several_keys_move_together(store: Store) -> None:
    """counters_add counts its keys in one step: eight threads counting the same two keys
    each see equal values on both (counted one key at a time, one thread's pair could be
    (3, 4) and another's (4, 3): a login burst then got fewer guesses than the limit)."""
    barrier = threading.Barrier(8, timeout=10)
    seen: list[list[float]] = []

    def worker() -> None:
        barrier.wait()
        for _ in range(50):
            seen.append(store.counters_add(["c:name", "c:addr"], 1, keep=1e6, now=T0))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(a == b for a, b in seen), [pair for pair in seen if pair[0] != pair[1]][:5]
    assert sorted(a for a, _ in seen) == list(range(1, 401))
    assert store.counters_add(["c:addr", "c:other"], -1, keep=1e6, now=T0) == [399, -1]


def test_two_threads_never_lose_an_update(store: Store) -> None:
    barrier = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(500):
                assert take(store, "ip:t", 1, T0, rate=0, cap=HUGE).allowed
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert take(store, "ip:t", 0, T0, rate=0, cap=HUGE).level == 1000


def test_ping(store: Store) -> None:
    store.ping()


# -- the contract: a pure reference model --------------------------------------------


class ModelBucket:
    """The leaky bucket as the interface describes it, written independently."""

    def __init__(self) -> None:
        self.level = 0.0
        self.since: float | None = None

    def take(self, cost: float, rate: float, cap: float, now: float) -> tuple[bool, float]:
        level = 0.0
        if self.since is not None:
            level = max(self.level - rate * max(now - self.since, 0.0), 0.0)
        # Too close to the edge to say which side float rounding puts it.
        assume(abs(level + cost - cap) > REL * max(cap, 1.0))
        if level + cost > cap:
            return False, level
        if cost > 0:
            self.level = level + cost
            self.since = now if self.since is None else max(now, self.since)
        return True, level + cost


_keys = itertools.count()

steps = st.lists(
    st.tuples(
        st.floats(0, 30, allow_nan=False),  # seconds since the previous call
        st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]) | st.floats(0, 10, allow_nan=False),
    ),
    min_size=1,
    max_size=25,
)


# The store fixture outlives the examples; each example uses a fresh key.
fixture_ok = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fixture_ok
@given(
    ops=steps,
    rate=st.sampled_from([0.0, 0.25, 1.0]) | st.floats(0.001, 50, allow_nan=False),
    cap=st.floats(0, 20, allow_nan=False),
)
def test_bucket_agrees_with_reference_model(
    store: Store, ops: list[tuple[float, float]], rate: float, cap: float
) -> None:
    key, model, now = f"model:{next(_keys)}", ModelBucket(), T0
    for dt, cost in ops:
        now += dt
        allowed, level = model.take(cost, rate, cap, now)
        got = store.bucket_take(key, cost=cost, rate=rate, capacity=cap, now=now)
        assert got.allowed == allowed
        assert got.level == pytest.approx(level, rel=REL, abs=1e-12)
        if not allowed:
            want = (level + cost - cap) / rate if rate > 0 and cost <= cap else math.inf
            assert got.retry_after == pytest.approx(want, rel=REL)


@fixture_ok
@given(
    ops=st.lists(st.tuples(st.floats(0, 600), st.floats(-5, 50)), min_size=1, max_size=20),
    half_life=st.floats(1, 3600),
)
def test_points_agree_with_reference_model(
    store: Store, ops: list[tuple[float, float]], half_life: float
) -> None:
    # The model mirrors what is stored: a read (amount 0) stores nothing.
    key, stored, since, now = f"model:{next(_keys)}", 0.0, T0, T0
    for dt, amount in ops:
        now += dt
        value = stored * math.exp(-math.log(2) * (now - since) / half_life) + amount
        assume(abs(value - 0.01) > 1e-6)  # the zero threshold is an edge too
        value = value if value >= 0.01 else 0.0
        if amount != 0:
            stored, since = value, now
        got = store.points_add(key, amount, half_life=half_life, now=now)
        assert got == pytest.approx(value, rel=REL, abs=1e-12)


# -- open_store ------------------------------------------------------------------------


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_store("memory://"), MemoryStore)
    relative = open_store("sqlite:///./var/state.db")
    assert isinstance(relative, SqliteStore) and (tmp_path / "var" / "state.db").exists()
    absolute = open_store(f"sqlite:///{tmp_path}/abs/dir/s.db")  # four slashes in all
    assert absolute.path == str(tmp_path / "abs" / "dir" / "s.db")
    assert isinstance(open_store("redis://127.0.0.1:1/2"), RedisStore)
    assert isinstance(open_store("rediss://:pw@127.0.0.1:1/0"), RedisStore)
    relative.close()
    absolute.close()


@pytest.mark.parametrize("url", ["mysql://u:secret@h/db", "sqlite://x.db", "memory:", ""])
def test_unknown_store_url_lists_the_accepted_forms(url: str) -> None:
    with pytest.raises(StoreError) as err:
        open_store(url)
    assert "memory://" in str(err.value) and "sqlite:///" in str(err.value)
    assert "redis://" in str(err.value) and "secret" not in str(err.value)


def test_sqlite_refuses_an_in_memory_database() -> None:
    with pytest.raises(StoreError, match="memory://"):
        open_store("sqlite:///:memory:")


# -- several processes share one store ------------------------------------------------


def _take_in_process(url: str, key: str, n: int, start: object, done: object) -> None:
    """Child process: open the store itself, wait for the other, take n times."""
    store = open_store(url)
    start.wait(20)  # type: ignore[attr-defined]  # a barrier: both start together
    allowed = sum(take(store, key, 1, T0, rate=0, cap=HUGE).allowed for _ in range(n))
    store.close()
    done.put(allowed)  # type: ignore[attr-defined]


def _two_processes_take(url: str, key: str, n: int = 500) -> None:
    ctx = multiprocessing.get_context("spawn")  # a clean child: no inherited connections
    start, done = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_take_in_process, args=(url, key, n, start, done)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    try:
        assert [done.get(timeout=30) for _ in procs] == [n, n]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    assert [p.exitcode for p in procs] == [0, 0]


def test_sqlite_file_shared_by_two_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    _two_processes_take(url, "ip:shared")
    with open_store(url) as store:
        assert take(store, "ip:shared", 0, T0, rate=0, cap=HUGE).level == 1000


def test_sqlite_opens_while_another_connection_locks_the_new_file(tmp_path: Path) -> None:
    """On a fresh install, several milters open the same new file at once; while one
    switches it to WAL (an exclusive lock), the others wait instead of failing."""
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other(x)")
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        with SqliteStore(str(path), timeout=5) as store:
            assert take(store, "ip:a", 1, T0, rate=0).allowed
    finally:
        release.join()
        holder.close()


def test_redis_shared_by_two_processes(redis_server: RedisServer) -> None:
    key = f"ip:shared:{next(_keys)}"
    _two_processes_take(redis_server.url, key)
    with open_store(redis_server.url) as store:
        assert take(store, key, 0, T0, rate=0, cap=HUGE).level == 1000


# -- failures --------------------------------------------------------------------------


def test_fallback_to_memory_when_redis_port_is_closed() -> None:
    port = free_port()
    reasons: list[str] = []
    clock = [0.0]
    store = FallbackStore(
        open_store(f"redis://127.0.0.1:{port}/0", timeout=0.5),
        MemoryStore(),
        reasons.append,
        retry_after=10,
        clock=lambda: clock[0],
    )
    assert take(store, "ip:x", 5, T0).allowed
    assert not take(store, "ip:x", 1, T0).allowed  # the memory store counted
    assert store.degraded
    assert len(reasons) == 1 and f"127.0.0.1:{port}" in reasons[0]
    clock[0] = 11.0  # the primary is tried again, still dead: no second report
    assert take(store, "ip:x", 0, T0).level == 5
    assert len(reasons) == 1
    store.close()


class FlakyStore(MemoryStore):
    """A primary that is down while `down` is set, and counts the calls it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    def bucket_take(self, key: str, **kw: float) -> BucketResult:  # type: ignore[override]
        self.calls += 1
        if self.down:
            raise StoreUnavailable("flaky: down")
        return super().bucket_take(key, **kw)  # type: ignore[arg-type]


def test_fallback_waits_retry_after_then_returns_to_the_primary() -> None:
    primary, local, clock = FlakyStore(), MemoryStore(), [0.0]
    events: list[str] = []
    store = FallbackStore(
        primary, local, events.append, retry_after=10, clock=lambda: clock[0],
        on_recovered=lambda: events.append("up"),
    )
    take(store, "k", 1, T0)
    primary.down = True
    for _ in range(5):
        take(store, "k", 1, T0)
    assert primary.calls == 2, "a dead primary is not asked again before retry_after"
    assert events == ["flaky: down"] and local.records("", now=T0)[0].value == 5
    clock[0] = 10.0
    primary.down = False
    assert take(store, "k", 1, T0).level == 2  # served by the primary again
    assert events == ["flaky: down", "up"] and not store.degraded


def test_killed_redis_raises_store_unavailable() -> None:
    with RedisServer() as server:
        store = open_store(server.url, timeout=1.0)
        assert take(store, "ip:k", 1, T0).allowed
        server.kill()
        started = time.monotonic()
        for call in (
            lambda: take(store, "ip:k", 1, T0),
            lambda: store.points_add("p", 1, half_life=1, now=T0),
            lambda: store.records(""),
            lambda: store.delete(""),
            store.ping,
        ):
            with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{server.port}") as err:
                call()
            assert type(err.value) is StoreUnavailable
        assert time.monotonic() - started < 5
        store.close()


def test_silent_redis_times_out_as_store_unavailable() -> None:
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        store = open_store(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
            take(store, "ip:s", 1, T0)
        assert time.monotonic() - started < 2  # one timeout, not ten retries
        store.close()


def test_redis_command_error_is_a_store_error(redis_server: RedisServer) -> None:
    raw = redis.Redis(host="127.0.0.1", port=redis_server.port)
    raw.set("mailmoat:ip:wrongtype", "x")
    with open_store(redis_server.url) as store:
        with pytest.raises(StoreError) as err:
            take(store, "ip:wrongtype", 1, T0)
        assert type(err.value) is StoreError
    raw.delete("mailmoat:ip:wrongtype")
    raw.close()


def test_redis_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with RedisServer(extra_args=("--requirepass", "s3cret")) as server:
        with pytest.raises(StoreError, match="127.0.0.1"):
            open_store(server.url).ping()
        monkeypatch.setenv("MAILMOAT_REDIS_PASSWORD", "s3cret")
        with open_store(server.url) as store:
            store.ping()
        monkeypatch.delenv("MAILMOAT_REDIS_PASSWORD")
        with open_store(f"redis://:s3cret@127.0.0.1:{server.port}/0") as store:
            assert take(store, "ip:pw", 1, T0).allowed


def test_sqlite_locked_too_long_raises_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SqliteStore(str(path), timeout=0.2)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            take(store, "ip:l", 1, T0)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert take(store, "ip:l", 1, T0).allowed
    store.close()


# -- expired records really go away -----------------------------------------------------


def test_memory_purges_expired_records() -> None:
    store = MemoryStore(purge_every=10)
    for i in range(10):
        take(store, f"short:{i}", 1, T0, rate=1)
    # Sweeps come after as many writes as there are records: 20 here.
    for i in range(20):
        take(store, f"long:{i % 10}", 1, T0 + 100, rate=0)
    assert len(store) == 10


def test_sqlite_purges_expired_rows(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "p.db"), purge_every=10)
    for i in range(10):
        take(store, f"short:{i}", 1, T0, rate=1)
    for i in range(10):
        take(store, f"long:{i}", 1, T0 + 100, rate=0)
    rows = sqlite3.connect(tmp_path / "p.db").execute("SELECT count(*) FROM state").fetchone()
    assert rows == (10,)
    store.close()


def test_redis_expires_records_itself(redis_server: RedisServer) -> None:
    raw = redis.Redis(host="127.0.0.1", port=redis_server.port)
    with open_store(redis_server.url) as store:
        now = time.time()
        take(store, "ttl:b", 1, now, rate=20)  # drained after 50 ms
        store.points_add("ttl:p", 0.02, half_life=0.05, now=now)  # under 0.01 after 50 ms
        take(store, "ttl:keep", 1, now, rate=0)
        gone = ("mailmoat:ttl:b", "mailmoat:ttl:p")
        assert raw.exists(*gone, "mailmoat:ttl:keep") == 3
        time.sleep(0.2)  # worth nothing now, but kept for the grace (clock skew, round trip)
        assert raw.exists(*gone) == 2
        deadline = time.monotonic() + 5
        while raw.exists(*gone) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert raw.exists(*gone) == 0
        assert [r.key for r in store.records("ttl:")] == ["ttl:keep"]
    raw.close()
