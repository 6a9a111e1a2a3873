"""The audit log in Redis: several gateways append to one chain.

Keys (outside the Store's `mailmoat:` namespace, which the Store scans as its own):
  mailmoat.audit:records     sorted set, score = seq, member = the record's JSON
  mailmoat.audit:q:QUEUE_ID  sorted set of that message's seqs (m:MESSAGE_ID likewise)
  mailmoat.audit:tip         hash {seq, hash} of the last record written
  mailmoat.audit:anchor      hash {seq, hash} of the last record purged

A batch is written under WATCH of the tip: read it, seal the batch after it, MULTI/EXEC the
records and the new tip. Another writer moving the tip in between makes EXEC fail and the
batch is sealed again after the new tip (Lua has no sha256 to do it on the server).
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterator

import redis
from redis.exceptions import RedisError, WatchError

from ..errors import StoreUnavailable
from .base import Anchor, AuditLog, seal_batch
from .record import GENESIS, AuditRecord, Pending

PREFIX = "mailmoat.audit:"
RECORDS, TIP, ANCHOR = PREFIX + "records", PREFIX + "tip", PREFIX + "anchor"
RETRY_FOR = 10.0  # seconds a batch may keep losing the race before it counts as a failure
CHUNK = 500


class RedisAuditLog(AuditLog):
    def __init__(self, client: redis.Redis, where: str) -> None:
        super().__init__()
        self._client = client
        self.where = where

    def _fail(self, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"audit log on Redis {self.where}: {exc}")

    def _write(self, batch: list[Pending]) -> None:
        deadline = time.monotonic() + RETRY_FOR
        pause = 0.001
        try:
            with self._client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(TIP)
                        tip = _anchor(pipe.hmget(TIP, "seq", "hash"))
                        records = seal_batch(batch, tip)
                        pipe.multi()
                        pipe.zadd(RECORDS, {r.to_json(): r.seq for r in records})
                        for r in records:
                            if r.queue_id is not None:
                                pipe.zadd(PREFIX + "q:" + r.queue_id, {str(r.seq): r.seq})
                            if r.message_id is not None:
                                pipe.zadd(PREFIX + "m:" + r.message_id, {str(r.seq): r.seq})
                        pipe.hset(TIP, mapping={"seq": records[-1].seq,
                                                "hash": records[-1].hash})
                        pipe.execute()
                        return
                    except WatchError:
                        if time.monotonic() > deadline:
                            raise StoreUnavailable(f"audit log on Redis {self.where}: the "
                                                   "tip kept moving") from None
                        time.sleep(random.uniform(0, pause))
                        pause = min(pause * 2, 0.05)
        except RedisError as exc:
            raise self._fail(exc) from None

    def _records(self, *, queue_id: str | None = None, message_id: str | None = None,
                 since: float | None = None, until: float | None = None,
                 newest_first: bool = False) -> Iterator[AuditRecord]:
        try:
            if queue_id is not None or message_id is not None:
                found = self._indexed(queue_id, message_id)
                rows = reversed(found) if newest_first else iter(found)
            else:
                rows = self._scan(newest_first)
            for record in rows:
                if (queue_id is None or record.queue_id == queue_id) \
                        and (message_id is None or record.message_id == message_id) \
                        and (since is None or record.time >= since) \
                        and (until is None or record.time < until):
                    yield record
        except RedisError as exc:
            raise self._fail(exc) from None

    def _indexed(self, queue_id: str | None, message_id: str | None) -> list[AuditRecord]:
        key = PREFIX + ("q:" + queue_id if queue_id is not None else "m:" + str(message_id))
        seqs = [int(s) for s in self._client.zrange(key, 0, -1)]
        pipe = self._client.pipeline(transaction=False)
        for seq in seqs:
            pipe.zrangebyscore(RECORDS, seq, seq)
        return [AuditRecord.from_json(m) for members in pipe.execute() for m in members]

    def _scan(self, newest_first: bool) -> Iterator[AuditRecord]:
        """Every record in chunks by seq (a purge meanwhile only shortens the start)."""
        if newest_first:
            top = float("+inf")
            while True:
                members = self._client.zrevrangebyscore(RECORDS, f"({top}" if top != float(
                    "+inf") else "+inf", "-inf", start=0, num=CHUNK, withscores=True)
                if not members:
                    return
                for member, _ in members:
                    yield AuditRecord.from_json(member)
                top = int(members[-1][1])
        else:
            low = 0
            while True:
                members = self._client.zrangebyscore(RECORDS, f"({low}", "+inf", start=0,
                                                     num=CHUNK, withscores=True)
                if not members:
                    return
                for member, _ in members:
                    yield AuditRecord.from_json(member)
                low = int(members[-1][1])

    def _snapshot(self) -> tuple[Anchor, Anchor, list[AuditRecord]]:
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.hmget(ANCHOR, "seq", "hash")
            pipe.hmget(TIP, "seq", "hash")
            pipe.zrange(RECORDS, 0, -1, withscores=True)
            anchor, tip, members = pipe.execute()
        except RedisError as exc:
            raise self._fail(exc) from None
        records = []
        for member, score in members:
            try:
                records.append(AuditRecord.from_json(member))
            except (ValueError, KeyError, TypeError):  # not a record: it breaks the chain
                records.append(AuditRecord(int(score), 0.0, "unreadable", None, None, None,
                                           None, {}, "", ""))
        return _anchor(anchor), _anchor(tip), records

    def purge(self, before: float) -> int:
        try:
            with self._client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(ANCHOR)  # appends only add after the tip
                        last: AuditRecord | None = None
                        for member in pipe.zrange(RECORDS, 0, -1):
                            record = AuditRecord.from_json(member)
                            if record.time >= before:
                                break
                            last = record
                        if last is None:
                            pipe.unwatch()
                            return 0
                        old = [AuditRecord.from_json(m)
                               for m in pipe.zrangebyscore(RECORDS, "-inf", last.seq)]
                        pipe.multi()
                        pipe.zremrangebyscore(RECORDS, "-inf", last.seq)
                        for key in {PREFIX + "q:" + r.queue_id for r in old if r.queue_id} | {
                                PREFIX + "m:" + r.message_id for r in old if r.message_id}:
                            pipe.zremrangebyscore(key, "-inf", last.seq)
                        pipe.hset(ANCHOR, mapping={"seq": last.seq, "hash": last.hash})
                        pipe.execute()
                        return len(old)
                    except WatchError:
                        time.sleep(random.uniform(0, 0.01))
        except RedisError as exc:
            raise self._fail(exc) from None

    def _close(self) -> None:
        self._client.close()


def _anchor(values: list) -> Anchor:
    seq, hash_ = values
    if seq is None:
        return Anchor(0, GENESIS)
    return Anchor(int(seq), hash_.decode() if isinstance(hash_, bytes) else str(hash_))
