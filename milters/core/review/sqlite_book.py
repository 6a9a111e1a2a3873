"""The review book in SQLite: a file of its own beside the store's (state.db ->
state-review.db), so a decision never waits on the rate limiter's write lock.

A decision is one BEGIN IMMEDIATE transaction (read, check, write, mark the token): the
milter, the console and the timer, each a process of its own, take turns on the file.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from typing import Iterator

from ..errors import ReviewError, StoreError, StoreUnavailable
from .base import Change, ReviewBook, refuse_unknown, refuse_used
from .record import ReviewRecord

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS review ("
    " id TEXT PRIMARY KEY, state TEXT NOT NULL, deadline REAL NOT NULL, body TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS review_due ON review(state, deadline)",
    "CREATE TABLE IF NOT EXISTS review_used ("
    " review_id TEXT NOT NULL, token TEXT NOT NULL, PRIMARY KEY (review_id, token))",
)
BUSY_WAIT = 10.0  # seconds a decision waits for the write lock before it is a failure


class SqliteReviewBook(ReviewBook):
    def __init__(self, path: str, *, timeout: float = BUSY_WAIT) -> None:
        if path in ("", ":memory:") or path.startswith("file:"):
            raise StoreError(f"the review book needs a file path (got {path!r})")
        self.path = os.path.abspath(path)
        self._timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._lock = threading.RLock()  # one connection per process, one user at a time

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never a parent's connection
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=self._timeout,
                                       isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # a decision must survive a crash
                for statement in _SCHEMA:
                    conn.execute(statement)
            except (sqlite3.Error, OSError) as exc:
                raise StoreUnavailable(f"review book {self.path}: {exc}") from None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _run(self, work, *, write: bool):  # type: ignore[no-untyped-def]
        """work(conn) inside one transaction; sqlite errors become StoreUnavailable."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"review book {self.path}: {exc}") from None
            try:
                result = work(conn)
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise StoreUnavailable(f"review book {self.path}: {exc}") from None
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"review book {self.path}: {exc}") from None
            return result

    def _insert(self, record: ReviewRecord) -> None:
        def work(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("INSERT INTO review(id, state, deadline, body) VALUES (?,?,?,?)",
                             (record.id, record.state, record.deadline, record.to_json()))
            except sqlite3.IntegrityError:
                raise ReviewError(f"review {record.id} exists already") from None
        self._run(work, write=True)

    def _load(self, review_id: str) -> ReviewRecord | None:
        row = self._run(lambda conn: conn.execute(
            "SELECT body FROM review WHERE id = ?", (review_id,)).fetchone(), write=False)
        return ReviewRecord.from_json(row[0]) if row else None

    def _change(self, review_id: str, token_id: str | None, change: Change) -> ReviewRecord:
        def work(conn: sqlite3.Connection) -> ReviewRecord:
            row = conn.execute("SELECT body FROM review WHERE id = ?", (review_id,)).fetchone()
            if row is None:
                raise refuse_unknown()
            if token_id is not None and conn.execute(
                    "SELECT 1 FROM review_used WHERE review_id = ? AND token = ?",
                    (review_id, token_id)).fetchone():
                raise refuse_used()
            new = change(ReviewRecord.from_json(row[0]))
            conn.execute("UPDATE review SET state = ?, deadline = ?, body = ? WHERE id = ?",
                         (new.state, new.deadline, new.to_json(), review_id))
            if token_id is not None:
                conn.execute("INSERT INTO review_used(review_id, token) VALUES (?, ?)",
                             (review_id, token_id))
            return new
        return self._run(work, write=True)

    def _pending(self) -> Iterator[ReviewRecord]:
        rows = self._run(lambda conn: conn.execute(
            "SELECT body FROM review WHERE state = 'pending'").fetchall(), write=False)
        return (ReviewRecord.from_json(row[0]) for row in rows)

    def _due(self, now: float, limit: int) -> list[ReviewRecord]:
        rows = self._run(lambda conn: conn.execute(
            "SELECT body FROM review WHERE state = 'pending' AND deadline <= ?"
            " ORDER BY deadline, id LIMIT ?", (now, limit)).fetchall(), write=False)
        return [ReviewRecord.from_json(row[0]) for row in rows]

    def _undone(self, limit: int) -> list[ReviewRecord]:
        # The decided records are few against the pending ones' index; JSON1 reads the mark.
        rows = self._run(lambda conn: conn.execute(
            "SELECT body FROM review WHERE state != 'pending'"
            " AND COALESCE(json_extract(body, '$.carried_out'), 0) = 0 LIMIT ?",
            (limit,)).fetchall(), write=False)
        return [ReviewRecord.from_json(row[0]) for row in rows]

    def _token_used(self, review_id: str, token_id: str) -> bool:
        return bool(self._run(lambda conn: conn.execute(
            "SELECT 1 FROM review_used WHERE review_id = ? AND token = ?",
            (review_id, str(token_id))).fetchone(), write=False))

    def _purge(self, before: float, limit: int) -> int:
        def work(conn: sqlite3.Connection) -> int:
            ids = [row[0] for row in conn.execute(
                "SELECT id FROM review WHERE state != 'pending'"
                " AND COALESCE(json_extract(body, '$.carried_out'), 0) > 0"
                " AND json_extract(body, '$.carried_out') < ? LIMIT ?", (before, limit))]
            for review_id in ids:
                conn.execute("DELETE FROM review WHERE id = ?", (review_id,))
                conn.execute("DELETE FROM review_used WHERE review_id = ?", (review_id,))
            return len(ids)
        return int(self._run(work, write=True))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


__all__ = ["SqliteReviewBook"]
