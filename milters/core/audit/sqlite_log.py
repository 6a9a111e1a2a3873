"""The audit log in SQLite: tables of their own in the Store's file (or a file of its own).

One batch is one write transaction (BEGIN IMMEDIATE: read the tip, insert, commit), so the
smtpd, the delivery process and each milter process, all appending, keep one linear chain.
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator

from ..errors import StoreError, StoreUnavailable
from .base import Anchor, AuditLog, first_kept, seal_batch
from .record import GENESIS, AuditRecord, Pending, canonical

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS audit ("
    " seq INTEGER PRIMARY KEY, time REAL NOT NULL, event TEXT NOT NULL, queue_id TEXT,"
    " message_id TEXT, actor TEXT, source TEXT, fields TEXT NOT NULL,"
    " prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS audit_queue_id ON audit(queue_id)",
    "CREATE INDEX IF NOT EXISTS audit_message_id ON audit(message_id)",
    "CREATE INDEX IF NOT EXISTS audit_time ON audit(time)",
    # name 'anchor': the last purged record; name 'tip': the last record written.
    "CREATE TABLE IF NOT EXISTS audit_mark ("
    " name TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL)",
)
_COLUMNS = "seq, time, event, queue_id, message_id, actor, source, fields, prev_hash, hash"
_INSERT = f"INSERT INTO audit({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SET_MARK = ("INSERT INTO audit_mark(name, seq, hash) VALUES (?, ?, ?)"
             " ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, hash = excluded.hash")
# counts() in one pass: per bucket and event, with the detail of base.detail_events (a
# row whose JSON was broken by a change is counted by its event only, never an error).
_COUNTS = (
    "SELECT CAST(time / ?1 AS INTEGER) * ?1, event, CASE"
    " WHEN event = 'queued' AND json_valid(fields)"
    "  AND json_extract(fields, '$.held') IS NOT NULL THEN 'held'"
    " WHEN event = 'milter_verdict' AND json_valid(fields)"
    "  AND json_type(fields, '$.action') = 'text' THEN json_extract(fields, '$.action')"
    " END, COUNT(*) FROM audit WHERE time >= ?2 AND time < ?3 GROUP BY 1, 2, 3")
CHUNK = 1000  # records read at a time by searches
BUSY_WAIT = 10.0  # seconds a batch waits for the write lock before it counts as a failure


class SqliteAuditLog(AuditLog):
    def __init__(self, path: str, *, timeout: float = BUSY_WAIT) -> None:
        super().__init__()
        if path in ("", ":memory:") or path.startswith("file:"):
            raise StoreError(f"the audit log needs a file path (got {path!r}); use memory://")
        self.path = os.path.abspath(path)
        self._timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._conn_lock = threading.RLock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never a connection of a parent
            deadline = time.monotonic() + self._timeout
            while True:
                try:
                    conn = self._open()
                    break
                except sqlite3.OperationalError as exc:
                    # Processes that start together: one switching a new file to WAL locks
                    # even the schema read of the others, and SQLite's busy handler does
                    # not wait for that (the Store retries the same way).
                    if not ("locked" in str(exc) or "busy" in str(exc)) \
                            or time.monotonic() > deadline:
                        raise StoreUnavailable(f"audit log {self.path}: {exc}") from None
                    time.sleep(random.uniform(0.001, 0.01))
                except (sqlite3.Error, OSError) as exc:
                    raise StoreUnavailable(f"audit log {self.path}: {exc}") from None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)  # as the Store does
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")  # a property of the file: once
            conn.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def _transaction(self, kind: str = "IMMEDIATE") -> "_Txn":
        return _Txn(self, kind)

    # -- primitives ----------------------------------------------------------------------
    def _write(self, batch: list[Pending]) -> None:
        with self._transaction() as conn:
            tip = _mark(conn, "tip")
            records = seal_batch(batch, tip)
            conn.executemany(_INSERT, [_row(r) for r in records])
            conn.execute(_SET_MARK, ("tip", records[-1].seq, records[-1].hash))

    def _records(self, *, queue_id: str | None = None, message_id: str | None = None,
                 since: float | None = None, until: float | None = None,
                 newest_first: bool = False) -> Iterator[AuditRecord]:
        where, args = [], []
        for column, value in (("queue_id", queue_id), ("message_id", message_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if until is not None:
            where.append("time < ?")
            args.append(until)
        # In chunks by seq, each read on its own: a search over a long log neither holds
        # all of it in memory nor keeps the writers' connection from them.
        where.append("seq < ?" if newest_first else "seq > ?")
        sql = (f"SELECT {_COLUMNS} FROM audit WHERE " + " AND ".join(where)
               + (" ORDER BY seq DESC" if newest_first else " ORDER BY seq")
               + f" LIMIT {CHUNK}")
        after = 1 << 62 if newest_first else 0
        while True:
            with self._transaction("DEFERRED") as conn:
                rows = conn.execute(sql, [*args, after]).fetchall()
            yield from (_record(row) for row in rows)
            if len(rows) < CHUNK:
                return
            after = rows[-1][0]

    def _snapshot(self) -> tuple[Anchor, Anchor, Iterator[AuditRecord]]:
        """One read transaction (one WAL snapshot) for the whole walk, rows streamed."""
        txn = self._transaction("DEFERRED")
        conn = txn.__enter__()
        try:
            anchor, tip = _mark(conn, "anchor"), _mark(conn, "tip")
            cursor = conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq")
        except BaseException as exc:
            txn.__exit__(type(exc), exc, None)
            raise

        def rows() -> Iterator[AuditRecord]:
            try:
                for row in cursor:
                    yield _record(row)
            finally:
                cursor.close()
                txn.__exit__(None, None, None)
        return anchor, tip, rows()

    def counts(self, *, since: float, until: float, step: int) -> dict[tuple[float, str], int]:
        """As AuditLog.counts, grouped by SQLite (the overview asks for weeks of records)."""
        if step <= 0:
            raise ValueError("step must be positive")
        with self._transaction("DEFERRED") as conn:
            rows = conn.execute(_COUNTS, (step, since, until)).fetchall()
        out: dict[tuple[float, str], int] = {}
        for bucket, event, detail, count in rows:
            names = [event] if detail is None else [event, f"{event}:{detail}"]
            for key in ((float(bucket), name) for name in names):
                out[key] = out.get(key, 0) + count
        return out

    def purge(self, before: float) -> int:
        with self._transaction() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM audit WHERE seq <= ("
                                "SELECT COALESCE(MIN(seq), 1 << 62) FROM audit WHERE time >= ?)"
                                " ORDER BY seq", (before,))
            last = first_kept((_record(row) for row in rows), before)
            if last is None:
                return 0
            removed = conn.execute("DELETE FROM audit WHERE seq <= ?", (last.seq,)).rowcount
            conn.execute(_SET_MARK, ("anchor", last.seq, last.hash))
        return removed

    def _close(self) -> None:
        with self._conn_lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


class _Txn:
    """One transaction on the log's connection (threads of a process take turns)."""

    def __init__(self, log: SqliteAuditLog, kind: str) -> None:
        self.log, self.kind = log, kind

    def __enter__(self) -> sqlite3.Connection:
        self.log._conn_lock.acquire()
        try:
            conn = self.log._connection()
            deadline = time.monotonic() + self.log._timeout
            while True:
                try:
                    conn.execute(f"BEGIN {self.kind}")
                    return conn
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc) \
                            or time.monotonic() > deadline:
                        raise StoreUnavailable(f"audit log {self.log.path}: {exc}") from None
                    time.sleep(0.001)
        except BaseException:
            self.log._conn_lock.release()
            raise

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        try:
            conn = self.log._conn
            if conn is not None:
                try:
                    conn.execute("COMMIT" if kind is None else "ROLLBACK")
                except sqlite3.Error as error:
                    if kind is None:
                        raise StoreUnavailable(f"audit log {self.log.path}: {error}") from None
        finally:
            self.log._conn_lock.release()
        if isinstance(exc, sqlite3.Error):
            raise StoreUnavailable(f"audit log {self.log.path}: {exc}") from None


def _mark(conn: sqlite3.Connection, name: str) -> Anchor:
    row = conn.execute("SELECT seq, hash FROM audit_mark WHERE name = ?", (name,)).fetchone()
    return Anchor(row[0], row[1]) if row else Anchor(0, GENESIS)


def _row(record: AuditRecord) -> tuple:
    return (record.seq, record.time, record.event, record.queue_id, record.message_id,
            record.actor, record.source, canonical(record.fields),
            record.prev_hash, record.hash)


def _record(row: tuple) -> AuditRecord:
    try:
        fields = json.loads(row[7])
    except (TypeError, ValueError):
        fields = {"unreadable": str(row[7])[:200]}  # verify then reports the record
    return AuditRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                       fields if isinstance(fields, dict) else {"unreadable": str(fields)},
                       row[8], row[9])
