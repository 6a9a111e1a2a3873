"""The AuditLog interface and what every backend shares: the per-process buffer, search,
counts and the chain check.

append() only adds to a list in memory: the milter callbacks and the SMTP reply never wait
on a transaction or an fsync. flush() writes the buffer as one batch, in one transaction
that reads the chain's tip and adds the batch after it; a background thread flushes every
FLUSH_EVERY seconds, append() when FLUSH_AT records wait, and close() at exit. A SIGKILL
loses what waits in the buffer (at most FLUSH_EVERY seconds of events); the log lines,
written at once, still carry every event.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .record import GENESIS, AuditRecord, Pending, clean_fields, clean_optional, clean_text

FLUSH_EVERY = 0.5  # seconds between the background thread's batches
FLUSH_AT = 200  # records waiting that make append() write them at once
MAX_BUFFER = 20000  # when the backend is down: the oldest are dropped past this (and said)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int  # records checked (the purged ones are not counted)
    first_bad_seq: int | None = None
    reason: str = ""
    tip_seq: int = 0  # the last record's seq and hash: note them elsewhere to detect a
    tip_hash: str = GENESIS  # rewrite of the whole chain


@dataclass(frozen=True)
class Anchor:
    """Where the kept chain starts: the last purged record (GENESIS, 0 when none)."""

    seq: int = 0
    hash: str = GENESIS


class AuditLog(ABC):
    """The message stories, hash-chained. Subclasses implement the _write/_records/_tip
    primitives; the rest is shared."""

    def __init__(self) -> None:
        self._buffer: list[tuple[Any, ...]] = []  # append()'s arguments, as given
        self._lock = threading.Lock()  # guards _buffer
        self._write_lock = threading.Lock()  # one batch at a time from this process
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0  # records lost because the backend stayed down

    # -- writing -------------------------------------------------------------------------
    def append(self, event: str, *, queue_id: str | None = None, message_id: str | None = None,
               actor: str | None = None, source: str | None = None,
               now: float | None = None, **fields: Any) -> None:
        # Kept as given: cleaning and hashing happen in flush(), off the caller's path.
        pending = (time.time() if now is None else now, event, queue_id, message_id, actor,
                   source, fields)
        with self._lock:
            self._buffer.append(pending)
            if len(self._buffer) > MAX_BUFFER:
                del self._buffer[0]
                self.dropped += 1
            waiting = len(self._buffer)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="audit-flush",
                                                daemon=True)
                self._thread.start()
        if waiting >= FLUSH_AT:
            self._wake.set()

    def flush(self) -> None:
        """Write what append buffered, in chain order after every record already written.
        On a store error the records stay buffered for the next try, and it is raised."""
        with self._write_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            if not batch:
                return
            try:
                self._write([_cleaned(*raw) for raw in batch])
            except BaseException:
                with self._lock:
                    self._buffer[:0] = batch
                raise

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_EVERY)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # the store is down: keep the records, try again
                self._report(exc)

    def _report(self, exc: Exception) -> None:
        from ..eventlog import log_event  # the tee skips this event: no loop
        log_event("audit_write_failed", level=logging.ERROR, error=clean_text(exc, 300),
                  waiting=len(self._buffer))

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        try:
            self.flush()
        finally:
            self._close()

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------
    def story(self, queue_id: str) -> list[AuditRecord]:
        """Every record of one message in the order things happened: by time, then seq
        (each process writes its own batches, so chain order is not event order)."""
        return sorted(self._records(queue_id=queue_id), key=lambda r: (r.time, r.seq))

    def search(self, *, text: str | None = None, queue_id: str | None = None,
               message_id: str | None = None, address: str | None = None,
               since: float | None = None, until: float | None = None,
               events: Collection[str] | None = None, limit: int = 200) -> list[AuditRecord]:
        """The newest matching records first, at most `limit`. `address` matches a whole
        address anywhere in the fields (case-insensitive); `text` any substring."""
        wanted = set(events) if events else None
        needle = text.lower() if text else None
        addr = address.strip().lower().strip("<>") if address else None
        found: list[AuditRecord] = []
        for record in self._records(queue_id=queue_id, message_id=message_id, since=since,
                                    until=until, newest_first=True):
            if wanted is not None and record.event not in wanted:
                continue
            if needle is not None and needle not in _searchable(record):
                continue
            if addr is not None and addr not in _addresses(record):
                continue
            found.append(record)
            if len(found) >= max(1, limit):
                break
        return found

    def counts(self, *, since: float, until: float, step: int) -> dict[tuple[float, str], int]:
        """(bucket start, event) -> number of records; buckets are multiples of step. Some
        records count under a detail name as well (detail_events)."""
        if step <= 0:
            raise ValueError("step must be positive")
        out: dict[tuple[float, str], int] = {}
        for record in self._records(since=since, until=until):
            bucket = float(int(record.time // step) * step)
            for name in (record.event, *detail_events(record.event, record.fields)):
                out[(bucket, name)] = out.get((bucket, name), 0) + 1
        return out

    def verify(self) -> VerifyResult:
        """Walk the chain from the anchor: each record's seq follows, its prev_hash is the
        hash before it, its hash is what its content gives; the last is the recorded tip."""
        anchor, tip, records = self._snapshot()
        try:
            return check_chain(anchor, tip, records)
        finally:
            close = getattr(records, "close", None)
            if close is not None:  # a stream: end its read transaction now
                close()

    # -- retention -----------------------------------------------------------------------
    @abstractmethod
    def purge(self, before: float) -> int:
        """Remove the oldest records, up to the first one at or after `before` (the chain's
        prefix only, so the rest stays verifiable from the new anchor); how many."""

    # -- the backend's primitives --------------------------------------------------------
    @abstractmethod
    def _write(self, batch: list[Pending]) -> None:
        """Atomically: read the tip, seal the batch after it, store it and the new tip."""

    @abstractmethod
    def _records(self, *, queue_id: str | None = None, message_id: str | None = None,
                 since: float | None = None, until: float | None = None,
                 newest_first: bool = False) -> Iterator[AuditRecord]:
        """Records matching these (cheap, indexed) criteria, in seq order or reversed."""

    @abstractmethod
    def _snapshot(self) -> tuple[Anchor, Anchor, Iterable[AuditRecord]]:
        """(anchor, tip, every kept record in seq order), read consistently."""

    def _close(self) -> None:
        """Release connections."""


def _cleaned(now: float, event: str, queue_id: Any, message_id: Any, actor: Any, source: Any,
             fields: dict[str, Any]) -> Pending:
    when = float(now)
    if not math.isfinite(when):  # JSON has no NaN: the record would not verify
        when = time.time()
    return Pending(when, clean_text(event, 100), clean_optional(queue_id),
                   clean_optional(message_id), clean_optional(actor), clean_optional(source),
                   clean_fields(fields))


def seal_batch(batch: list[Pending], tip: Anchor) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    seq, prev = tip.seq, tip.hash
    for pending in batch:
        seq += 1
        record = pending.seal(seq, prev)
        records.append(record)
        prev = record.hash
    return records


def first_kept(records: Iterable[AuditRecord], before: float) -> AuditRecord | None:
    """The last record of the prefix older than `before`, or None when none is."""
    last = None
    for record in records:
        if record.time >= before:
            break
        last = record
    return last


def check_chain(anchor: Anchor, tip: Anchor, records: Iterable[AuditRecord]) -> VerifyResult:
    expected_seq, prev = anchor.seq + 1, anchor.hash
    checked = 0
    for record in records:
        if record.seq != expected_seq or record.prev_hash != prev \
                or record.hash != record.expected_hash():
            return VerifyResult(False, checked, expected_seq, "hash does not match "
                                "(changed or removed)", tip.seq, tip.hash)
        checked += 1
        expected_seq, prev = record.seq + 1, record.hash
    if (expected_seq - 1, prev) != (tip.seq, tip.hash):
        # The records end before the recorded tip (the newest removed), or the tip was set
        # back: the first record missing or unaccounted for is the bad one.
        return VerifyResult(False, checked, min(expected_seq, tip.seq + 1),
                            "hash does not match (changed or removed)", tip.seq, tip.hash)
    return VerifyResult(True, checked, None, "", tip.seq, tip.hash)


def detail_events(event: str, fields: dict[str, Any]) -> tuple[str, ...]:
    """The names a record counts under besides its event, where the event alone says too
    little for the overview: a message held on arrival is a `queued` record with `held`
    ("queued:held"); a milter's refusal is a `milter_verdict` with its action
    ("milter_verdict:reject"). SqliteAuditLog.counts does the same in SQL."""
    if event == "queued" and fields.get("held") is not None:
        return ("queued:held",)
    if event == "milter_verdict" and isinstance(fields.get("action"), str):
        return (f"milter_verdict:{fields['action']}",)
    return ()


def _searchable(record: AuditRecord) -> str:
    parts = [record.event, record.queue_id or "", record.message_id or "", record.actor or "",
             record.source or "", *(str(v) for v in _values(record.fields))]
    return "\n".join(parts).lower()


def _values(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _values(item)
    elif isinstance(value, list):
        for item in value:
            yield from _values(item)
    else:
        yield value


def _addresses(record: AuditRecord) -> set[str]:
    """Every address in the record's text values (comma-separated lists split)."""
    found: set[str] = set()
    for value in _values(record.fields):
        if isinstance(value, str) and "@" in value:
            for part in value.replace(";", ",").split(","):
                found.add(part.strip().strip("<>").lower())
    return found
