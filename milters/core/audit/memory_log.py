"""The audit log in this process's memory (memory:// stores, tests)."""
from __future__ import annotations

import threading
from collections.abc import Iterator

from .base import Anchor, AuditLog, first_kept, seal_batch
from .record import AuditRecord, Pending


class MemoryAuditLog(AuditLog):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[AuditRecord] = []  # tests may change these to play the attacker
        self.anchor = Anchor()
        self.tip = Anchor()
        self._data_lock = threading.Lock()

    def _write(self, batch: list[Pending]) -> None:
        with self._data_lock:
            records = seal_batch(batch, self.tip)
            self.rows.extend(records)
            self.tip = Anchor(records[-1].seq, records[-1].hash)

    def _records(self, *, queue_id: str | None = None, message_id: str | None = None,
                 since: float | None = None, until: float | None = None,
                 newest_first: bool = False) -> Iterator[AuditRecord]:
        with self._data_lock:
            rows = list(reversed(self.rows) if newest_first else self.rows)
        return (r for r in rows
                if (queue_id is None or r.queue_id == queue_id)
                and (message_id is None or r.message_id == message_id)
                and (since is None or r.time >= since) and (until is None or r.time < until))

    def _snapshot(self) -> tuple[Anchor, Anchor, list[AuditRecord]]:
        with self._data_lock:
            return self.anchor, self.tip, list(self.rows)

    def purge(self, before: float) -> int:
        with self._data_lock:
            last = first_kept(self.rows, before)
            if last is None:
                return 0
            removed = sum(1 for r in self.rows if r.seq <= last.seq)
            self.rows = [r for r in self.rows if r.seq > last.seq]
            self.anchor = Anchor(last.seq, last.hash)
            return removed
