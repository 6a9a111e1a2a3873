"""SQLite store: the embedded default, shared by the processes of one host.

Each operation is one short write transaction (BEGIN IMMEDIATE, read,
decide in Python, write, COMMIT), so it is atomic across threads and
processes. WAL with synchronous=NORMAL makes a commit an append to the
WAL without fsync; a crash may lose the last few decisions, which a rate
limiter can afford.

SQLite's own busy handler sleeps in whole milliseconds (1, 2, 5, 10 ...),
which stalls two processes taking turns on the write lock; we retry
ourselves with sub-millisecond backoff instead.
"""
from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from milters.core.errors import StoreError, StoreUnavailable

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
    live_row,
    newer_format_error,
    STATE_FORMAT,
)

T = TypeVar("T")

# Delete expired rows after this many writes, not on every call.
PURGE_EVERY = 1000
# Idle connections kept open; more are opened under load and closed afterwards.
POOL_SIZE = 8
# Backoff while another connection writes: a commit takes tens of
# microseconds, so start there; the cap bounds the wait after a long one.
PAUSE_FIRST = 0.0001
PAUSE_MAX = 0.001

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS state ("
    " key TEXT PRIMARY KEY, value REAL NOT NULL, updated REAL NOT NULL, expires REAL"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS state_expires ON state(expires)",
)
# Statements that take a file from format N to N + 1, by N (format 0, before formats were
# kept, has format 1's table: it only gets its mark). None yet.
_MIGRATIONS: dict[int, tuple[str, ...]] = {}
_SELECT = "SELECT value, updated, expires FROM state WHERE key = ?"
_UPSERT = (
    "INSERT INTO state(key, value, updated, expires) VALUES (?, ?, ?, ?)"
    " ON CONFLICT(key) DO UPDATE SET"
    " value = excluded.value, updated = excluded.updated, expires = excluded.expires"
)
_UPSERT_MANY = (
    "INSERT INTO state(key, value, updated, expires) VALUES {rows}"
    " ON CONFLICT(key) DO UPDATE SET"
    " value = excluded.value, updated = excluded.updated, expires = excluded.expires"
)
_DELETE = "DELETE FROM state WHERE key = ?"
# substr() keeps LIKE/GLOB wildcards in a prefix from meaning anything.
_PREFIX = "key >= ?1 AND substr(key, 1, ?2) = ?1"

_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

# Connections inherited through fork(), never to be used nor freed.
_INHERITED: list[sqlite3.Connection] = []


class _PooledConnection(sqlite3.Connection):
    """A connection of the pool; `ready` once its own settings are made. They are made
    under the busy retry, not at connect: on a new file, another process may be switching
    it to WAL, which locks even the schema read that any PRAGMA starts with."""

    ready = False


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)


class SqliteStore(Store):
    """One table in one file; a small pool of connections shared by all threads.

    Not one connection per thread: libmilter starts a thread per SMTP session, so
    thread-local connections would open a file per session and never close it.
    """

    prefers_write_behind = True  # a write transaction costs 3-4x a SELECT (bench/ratelimit.py)

    def __init__(
        self, path: str, *, timeout: float = 2.0, purge_every: int = PURGE_EVERY
    ) -> None:
        if path in ("", ":memory:") or path.startswith("file:"):
            raise StoreError(f"sqlite store needs a file path (got {path!r}); use memory://")
        self.path = os.path.abspath(path)
        self._timeout = timeout
        self._purge_every = purge_every
        self._idle: list[_PooledConnection] = []  # connections free for the next operation
        self._conns: list[_PooledConnection] = []  # every open connection, for close()
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writes = 0
        self._closed = False
        self._pid = os.getpid()
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"sqlite {self.path}: cannot create {parent}: {exc}") from exc
        self._run(self._init_schema)

    # -- Store --------------------------------------------------------------

    def bucket_take(
        self, key: str, *, cost: float, rate: float, capacity: float, now: float
    ) -> BucketResult:
        check_bucket_args(cost, rate, capacity)

        def op(db: sqlite3.Connection) -> BucketResult:
            result, update = decide_bucket(
                self._load(db, key, now), cost=cost, rate=rate, capacity=capacity, now=now
            )
            self._apply(db, key, update)
            return result

        if cost == 0:  # a peek writes nothing, so it needs no write lock
            return self._run(op)
        return self._run(self._transaction(op), now=now)

    def points_add(self, key: str, amount: float, *, half_life: float, now: float) -> float:
        check_points_args(half_life)

        def op(db: sqlite3.Connection) -> float:
            value, update = decide_points(self._value(db, key), amount, half_life=half_life, now=now)
            self._apply(db, key, update)
            return value

        if amount == 0:  # a pure read needs no write lock
            return self._run(op)
        return self._run(self._transaction(op), now=now)

    def counters_add(self, keys: list[str], amount: float, *, keep: float,
                     now: float) -> list[float]:
        def op(db: sqlite3.Connection) -> list[float]:
            values = []
            for key in keys:
                value, update = decide_counter(self._load(db, key, now), amount, keep=keep,
                                               now=now)
                self._apply(db, key, update)
                values.append(value)
            return values

        return self._run(self._transaction(op), now=now)

    def admit(self, points_key: str | None, takes: list[Take], *, half_life: float,
              halve_every: float, refuse_at: float | None, now: float) -> Admission:
        check_points_args(half_life)
        for take in takes:
            check_bucket_args(take.cost, take.rate, take.burst)

        keys = [take.key for take in takes] + ([points_key] if points_key else [])
        select = ("SELECT key, value, updated, expires FROM state"
                  f" WHERE key IN ({','.join('?' * len(keys))})")

        def op(db: sqlite3.Connection) -> Admission:
            # One SELECT and at most one multi-row UPSERT: statements, not rows, are the cost.
            rows = {key: (value, updated, expires)
                    for key, value, updated, expires in db.execute(select, keys)}
            points = rows.get(points_key) if points_key else None
            admission, updates = decide_admission(
                None if points is None else (points[0], points[1]),
                [live_row(rows.get(take.key), now) for take in takes], takes, half_life=half_life,
                halve_every=halve_every, refuse_at=refuse_at, now=now)
            writes = [(take.key, u.value, u.updated, u.expires)
                      for take, u in zip(takes, updates) if u.write]
            if writes:
                db.execute(_UPSERT_MANY.format(rows=",".join(["(?,?,?,?)"] * len(writes))),
                           [field for row in writes for field in row])
            return admission

        if all(take.cost == 0 for take in takes):  # peeks and points only read
            return self._run(op)
        return self._run(self._transaction(op), now=now)

    def records(self, prefix: str, *, now: float | None = None) -> list[Record]:
        at = time.time() if now is None else now

        def op(db: sqlite3.Connection) -> list[Record]:
            rows = db.execute(
                f"SELECT key, value, updated FROM state WHERE {_PREFIX}"
                " AND (expires IS NULL OR expires >= ?3) ORDER BY key",  # not forgotten
                (prefix, len(prefix), at),
            ).fetchall()
            return [Record(k, v, u) for k, v, u in rows]

        return self._run(op)

    def delete(self, prefix: str) -> int:
        def op(db: sqlite3.Connection) -> int:
            return db.execute(f"DELETE FROM state WHERE {_PREFIX}", (prefix, len(prefix))).rowcount

        return self._run(op)

    def ping(self) -> None:
        self._run(lambda db: db.execute("SELECT 1").fetchone())

    def close(self) -> None:
        with self._conns_lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for db in conns:
            try:
                db.close()
            except sqlite3.Error:
                pass  # closing is best effort; the file stays consistent

    def purge(self, now: float) -> int:
        """Delete rows forgotten at `now` (base.is_forgotten); return how many."""
        return self._run(
            lambda db: db.execute(
                "DELETE FROM state WHERE expires IS NOT NULL AND expires < ?", (now,)
            ).rowcount
        )

    # -- internals ------------------------------------------------------------

    def _acquire(self) -> _PooledConnection:
        """An idle connection, or a new one; give it back with _release()."""
        with self._conns_lock:
            if self._pid != os.getpid():
                # A forked child must not use or even close its parent's connections
                # (closing may checkpoint the parent's WAL): keep them referenced, unused.
                self._pid = os.getpid()
                _INHERITED.extend(self._conns)
                self._conns, self._idle = [], []
            if self._closed:
                raise StoreError(f"sqlite {self.path}: store is closed")
            if self._idle:
                return self._idle.pop()
        try:
            # timeout=0: busy waits are ours (see module docstring).
            db = sqlite3.connect(self.path, timeout=0, isolation_level=None,
                                 check_same_thread=False, factory=_PooledConnection)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: cannot open: {exc}") from exc
        with self._conns_lock:
            self._conns.append(db)
        return db

    def _release(self, db: _PooledConnection) -> None:
        with self._conns_lock:
            if db not in self._conns:  # closed or inherited meanwhile
                return
            if len(self._idle) < POOL_SIZE:
                self._idle.append(db)
                return
            self._conns.remove(db)
        db.close()

    def _init_schema(self, db: sqlite3.Connection) -> None:
        """Create or upgrade the file to STATE_FORMAT (PRAGMA user_version); a file of a
        newer format is refused before anything is written to it."""
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > STATE_FORMAT:
            raise newer_format_error(f"sqlite {self.path}", found)
        # WAL is a property of the file; setting it again is a no-op.
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        if found == STATE_FORMAT:
            return
        # Processes that start together race to here: one transaction upgrades, the
        # others find the work done.
        db.execute("BEGIN IMMEDIATE")
        try:
            found = db.execute("PRAGMA user_version").fetchone()[0]
            if found > STATE_FORMAT:
                raise newer_format_error(f"sqlite {self.path}", found)
            for statement in _SCHEMA:
                db.execute(statement)
            for version in range(max(found, 1), STATE_FORMAT):
                for statement in _MIGRATIONS[version]:  # version -> version + 1
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {STATE_FORMAT}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _transaction(op: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
        """Wrap `op` in BEGIN IMMEDIATE ... COMMIT (rolled back on error)."""

        def run(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = op(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

        return run

    def _run(self, op: Callable[[sqlite3.Connection], T], now: float | None = None) -> T:
        """Run `op`, retrying while another connection holds the write lock. Writes (`now`
        given) from this process queue on a Python lock first: a thread handoff costs
        microseconds, SQLite's busy path costs a retry and a sleep."""
        if now is not None:
            with self._write_lock:
                return self._run_with_retry(op, now)
        return self._run_with_retry(op, now)

    def _run_with_retry(self, op: Callable[[sqlite3.Connection], T], now: float | None) -> T:
        db = self._acquire()
        try:
            deadline = time.monotonic() + self._timeout
            pause = PAUSE_FIRST
            while True:
                try:
                    if not db.ready:
                        db.execute("PRAGMA synchronous=NORMAL")
                        db.ready = True
                    result = op(db)
                    break
                except sqlite3.Error as exc:
                    if not _is_busy(exc):
                        raise StoreError(f"sqlite {self.path}: {exc}") from exc
                    if time.monotonic() >= deadline:
                        raise StoreUnavailable(
                            f"sqlite {self.path}: database locked for {self._timeout:g}s"
                        ) from exc
                # Jitter keeps two waiting processes from retrying in lockstep.
                time.sleep(pause * random.random())
                pause = min(pause * 2, PAUSE_MAX)
        finally:
            self._release(db)
        if now is not None:
            self._count_write(now)
        return result

    def _count_write(self, now: float) -> None:
        with self._conns_lock:
            self._writes += 1
            due = self._writes >= self._purge_every
            if due:
                self._writes = 0
        if due:
            try:
                self.purge(now)
            except StoreUnavailable:
                pass  # busy: the next round will purge

    @staticmethod
    def _load(db: sqlite3.Connection, key: str, now: float) -> tuple[float, float] | None:
        """A bucket or counter: absent once expired."""
        return live_row(db.execute(_SELECT, (key,)).fetchone(), now)

    @staticmethod
    def _value(db: sqlite3.Connection, key: str) -> tuple[float, float] | None:
        """A points score, expired or not: it decays to nothing by itself."""
        row = db.execute(_SELECT, (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    @staticmethod
    def _apply(db: sqlite3.Connection, key: str, update: Update) -> None:
        if update.delete:
            db.execute(_DELETE, (key,))
        elif update.write:
            db.execute(_UPSERT, (key, update.value, update.updated, update.expires))
