"""The review book in Redis (a redis:// store: several gateways share the reviews).

Keys (outside the Store's `mailmoat:` namespace, which the Store scans as its own):
  mailmoat.review:r:ID       the record's JSON
  mailmoat.review:pending    sorted set of pending IDs, score = deadline (due() reads it)
  mailmoat.review:used:ID    set of the review's used link tokens
  mailmoat.review:undone     sorted set of decided IDs not yet carried out (undone() reads it)
  mailmoat.review:done       sorted set of carried-out IDs, score = when (purge() reads it)

A change WATCHes the record and its used set, reads, applies the rule, and writes record,
pending set and token mark in one MULTI/EXEC; a concurrent writer makes EXEC fail and the
change is tried again on what that writer left (then usually refused: already decided).
"""
from __future__ import annotations

import random
import time
from typing import Callable, Iterator

import redis
from redis.exceptions import RedisError, WatchError

from ..errors import ReviewError, StoreUnavailable
from .base import Change, ReviewBook, refuse_unknown, refuse_used
from .record import ReviewRecord

PREFIX = "mailmoat.review:"
PENDING = PREFIX + "pending"
UNDONE = PREFIX + "undone"  # decided, not yet carried out; score = the decision's time
DONE = PREFIX + "done"  # carried out; score = when
RETRY_FOR = 10.0  # seconds a change may keep losing the race before it is a failure
CHUNK = 200
# Record and pending entry together, and neither when the ID exists (a decided record must
# never be put back among the pending ones).
_CREATE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  return 1
end
return 0
"""


def _record_key(review_id: str) -> str:
    return PREFIX + "r:" + review_id


def _used_key(review_id: str) -> str:
    return PREFIX + "used:" + review_id


class RedisReviewBook(ReviewBook):
    def __init__(self, client: redis.Redis, where: str) -> None:
        self._client = client
        self.where = where

    def _fail(self, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"review book on Redis {self.where}: {exc}")

    def _insert(self, record: ReviewRecord) -> None:
        try:
            created = self._client.eval(_CREATE, 2, _record_key(record.id), PENDING,
                                        record.to_json(), record.id, repr(record.deadline))
        except RedisError as exc:
            raise self._fail(exc) from None
        if not created:
            raise ReviewError(f"review {record.id} exists already")

    def _load(self, review_id: str) -> ReviewRecord | None:
        try:
            body = self._client.get(_record_key(review_id))
        except RedisError as exc:
            raise self._fail(exc) from None
        return ReviewRecord.from_json(body) if body is not None else None

    def _change(self, review_id: str, token_id: str | None, change: Change) -> ReviewRecord:
        key, used = _record_key(review_id), _used_key(review_id)
        deadline = time.monotonic() + RETRY_FOR
        pause = 0.001
        try:
            with self._client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(key, used)
                        body = pipe.get(key)
                        if body is None:
                            raise refuse_unknown()
                        if token_id is not None and pipe.sismember(used, token_id):
                            raise refuse_used()
                        new = change(ReviewRecord.from_json(body))
                        pipe.multi()
                        pipe.set(key, new.to_json())
                        if new.state == "pending":
                            pipe.zadd(PENDING, {review_id: new.deadline})
                        else:
                            pipe.zrem(PENDING, review_id)
                        if new.state != "pending" and not new.carried_out:
                            when = new.decisions[-1].time if new.decisions else 0.0
                            pipe.zadd(UNDONE, {review_id: when})
                        else:
                            pipe.zrem(UNDONE, review_id)
                        if new.carried_out:
                            pipe.zadd(DONE, {review_id: new.carried_out})
                        if token_id is not None:
                            pipe.sadd(used, token_id)
                        pipe.execute()
                        return new
                    except WatchError:
                        if time.monotonic() > deadline:
                            raise StoreUnavailable(f"review book on Redis {self.where}: "
                                                   f"review {review_id} kept changing") from None
                        time.sleep(random.uniform(0, pause))
                        pause = min(pause * 2, 0.05)
        except RedisError as exc:
            raise self._fail(exc) from None

    def _bodies(self, ids: list[str],
                keep: Callable[[ReviewRecord], bool] = lambda r: r.state == "pending"
                ) -> list[ReviewRecord]:
        """The records of `ids` that still pass `keep` (a record may change between the
        index's read and its own: pending by default)."""
        records = []
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            for body in self._client.mget([_record_key(i) for i in chunk]):
                if body is not None:
                    record = ReviewRecord.from_json(body)
                    if keep(record):
                        records.append(record)
        return records

    def _pending(self) -> Iterator[ReviewRecord]:
        try:
            return iter(self._bodies(self._client.zrange(PENDING, 0, -1)))
        except RedisError as exc:
            raise self._fail(exc) from None

    def _due(self, now: float, limit: int) -> list[ReviewRecord]:
        try:
            ids = self._client.zrangebyscore(PENDING, "-inf", now, start=0, num=limit)
            return self._bodies(ids)
        except RedisError as exc:
            raise self._fail(exc) from None

    def _undone(self, limit: int) -> list[ReviewRecord]:
        try:
            ids = self._client.zrange(UNDONE, 0, max(limit - 1, 0)) if limit else []
            return self._bodies(ids, lambda r: r.state != "pending" and not r.carried_out)
        except RedisError as exc:
            raise self._fail(exc) from None

    def _token_used(self, review_id: str, token_id: str) -> bool:
        try:
            return bool(self._client.sismember(_used_key(review_id), str(token_id)))
        except RedisError as exc:
            raise self._fail(exc) from None

    def _purge(self, before: float, limit: int) -> int:
        try:
            ids = self._client.zrangebyscore(DONE, "-inf", f"({before!r}", start=0,
                                             num=limit) if limit else []
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                with self._client.pipeline() as pipe:  # MULTI: a record never half gone
                    pipe.delete(*[_record_key(i) for i in chunk],
                                *[_used_key(i) for i in chunk])
                    pipe.zrem(DONE, *chunk)
                    pipe.execute()
            return len(ids)
        except RedisError as exc:
            raise self._fail(exc) from None

    def close(self) -> None:
        try:
            self._client.close()
        except RedisError:
            pass
