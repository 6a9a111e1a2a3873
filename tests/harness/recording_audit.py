"""A stand-in for milters/core/audit's AuditLog in tests of mta/operations until the real
one is merged: it keeps records in memory, chained like the real one, and answers story,
search and counts. Tests only."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Collection


@dataclass(frozen=True)
class Record:
    seq: int
    time: float
    event: str
    queue_id: str | None
    message_id: str | None
    actor: str | None
    source: str | None
    fields: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass
class RecordingAudit:
    records: list[Record] = field(default_factory=list)
    flushes: int = 0

    def append(self, event: str, *, queue_id: str | None = None, message_id: str | None = None,
               actor: str | None = None, source: str | None = None, now: float | None = None,
               **fields: Any) -> None:
        prev = self.records[-1].hash if self.records else "0" * 64
        body = {"seq": len(self.records) + 1, "time": time.time() if now is None else now,
                "event": event, "queue_id": queue_id, "message_id": message_id,
                "actor": actor, "source": source, "fields": fields}
        digest = hashlib.sha256((prev + json.dumps(body, sort_keys=True)).encode()).hexdigest()
        self.records.append(Record(**body, prev_hash=prev, hash=digest))  # type: ignore[arg-type]

    def flush(self) -> None:
        self.flushes += 1

    def story(self, queue_id: str) -> list[Record]:
        return [r for r in self.records if r.queue_id == queue_id]

    def search(self, *, text: str | None = None, queue_id: str | None = None,
               message_id: str | None = None, address: str | None = None,
               since: float | None = None, until: float | None = None,
               events: Collection[str] | None = None, limit: int = 200) -> list[Record]:
        found = []
        for r in self.records:
            flat = json.dumps(r.fields).lower()
            if ((queue_id and r.queue_id != queue_id) or (message_id and r.message_id != message_id)
                    or (address and address.lower() not in flat)
                    or (text and text.lower() not in flat + r.event)
                    or (since is not None and r.time < since)
                    or (until is not None and r.time >= until)
                    or (events and r.event not in events)):
                continue
            found.append(r)
        return found[:limit]

    def counts(self, *, since: float, until: float, step: int) -> dict[tuple[float, str], int]:
        out: dict[tuple[float, str], int] = {}
        for r in self.records:
            if since <= r.time < until:
                key = (float(int(r.time // step) * step), r.event)
                out[key] = out.get(key, 0) + 1
        return out
