"""The review book in memory (memory:// stores: tests, one process)."""
from __future__ import annotations

import threading
from typing import Iterator

from ..errors import ReviewError
from .base import Change, ReviewBook, refuse_unknown, refuse_used
from .record import ReviewRecord


class MemoryReviewBook(ReviewBook):
    def __init__(self) -> None:
        self._records: dict[str, ReviewRecord] = {}
        self._used: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # a decision is read-check-write as one step

    def _insert(self, record: ReviewRecord) -> None:
        with self._lock:
            if record.id in self._records:
                raise ReviewError(f"review {record.id} exists already")
            self._records[record.id] = record

    def _load(self, review_id: str) -> ReviewRecord | None:
        return self._records.get(review_id)

    def _change(self, review_id: str, token_id: str | None, change: Change) -> ReviewRecord:
        with self._lock:
            record = self._records.get(review_id)
            if record is None:
                raise refuse_unknown()
            if token_id is not None and (review_id, token_id) in self._used:
                raise refuse_used()
            new = change(record)
            self._records[review_id] = new
            if token_id is not None:
                self._used.add((review_id, token_id))
            return new

    def _pending(self) -> Iterator[ReviewRecord]:
        with self._lock:
            pending = [r for r in self._records.values() if r.state == "pending"]
        return iter(pending)

    def _due(self, now: float, limit: int) -> list[ReviewRecord]:
        due = [r for r in self._pending() if r.deadline <= now]
        return sorted(due, key=lambda r: (r.deadline, r.id))[:limit]

    def _undone(self, limit: int) -> list[ReviewRecord]:
        with self._lock:
            return [r for r in self._records.values()
                    if r.state != "pending" and not r.carried_out][:limit]

    def _token_used(self, review_id: str, token_id: str) -> bool:
        return (review_id, token_id) in self._used

    def _purge(self, before: float, limit: int) -> int:
        with self._lock:
            old = [i for i, r in self._records.items()
                   if r.carried_out and r.carried_out < before][:limit]
            for review_id in old:
                del self._records[review_id]
            self._used = {(i, t) for i, t in self._used if i not in old}
            return len(old)
