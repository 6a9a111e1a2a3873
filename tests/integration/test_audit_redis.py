"""The audit log on a real Redis: retention keeps the chain verifiable, and a record changed,
removed or swapped in Redis is found at the first record it touches."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import redis

from milters.core.audit import AuditLog, chain_hash, open_audit_log
from milters.core.audit.redis_log import RECORDS, TIP
from milters.core.config import load_config
from tests.harness.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    made = redis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    _forget(made)  # the server is shared by the run: only our keys
    yield made
    _forget(made)


def _forget(client: redis.Redis) -> None:
    for key in client.scan_iter(match="mailmoat.audit:*"):
        client.delete(key)


@pytest.fixture
def log(tmp_path: Path, redis_server: RedisServer, client: redis.Redis) -> Iterator[AuditLog]:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store: {redis_server.url}\n")
    made = open_audit_log(load_config(config))
    for n in range(10):
        made.append("queued", queue_id=f"Q{n}", now=1000.0 + n, sender="a@example.jp")
    made.flush()
    yield made
    made.close()


def _member(client: redis.Redis, seq: int) -> str:
    [member] = client.zrangebyscore(RECORDS, seq, seq)
    return member


def test_retention_on_redis_keeps_the_rest_verifiable(log: AuditLog,
                                                      client: redis.Redis) -> None:
    assert log.purge(before=1004.0) == 4
    result = log.verify()
    assert (result.ok, result.checked) == (True, 6)
    assert log.story("Q1") == [] and [r.seq for r in log.story("Q7")] == [8]
    assert not client.exists("mailmoat.audit:q:Q1")  # the index of purged records goes too
    log.append("delivered", queue_id="Q7", now=2000.0)
    log.flush()
    assert log.verify().ok and [r.event for r in log.story("Q7")] == ["queued", "delivered"]


@pytest.mark.parametrize("how, first_bad", [("change", 4), ("remove", 4), ("swap", 3),
                                            ("cut", 10)])
def test_tampering_in_redis_names_the_first_bad_record(log: AuditLog, client: redis.Redis,
                                                       how: str, first_bad: int) -> None:
    assert log.verify().ok
    if how == "change":
        data = json.loads(_member(client, 4))
        data["fields"]["sender"] = "mallory@example.jp"
        client.zrem(RECORDS, _member(client, 4))
        client.zadd(RECORDS, {json.dumps(data): 4})
    elif how == "remove":
        client.zrem(RECORDS, _member(client, 4))
    elif how == "swap":  # contents traded, each keeping the other's place
        three, five = _member(client, 3), _member(client, 5)
        client.zadd(RECORDS, {three: 5, five: 3})
    elif how == "cut":
        client.zremrangebyscore(RECORDS, 10, 10)
    result = log.verify()
    assert (result.ok, result.first_bad_seq) == (False, first_bad), result


def test_a_record_rehashed_in_redis_breaks_the_next_link(log: AuditLog,
                                                         client: redis.Redis) -> None:
    data = json.loads(_member(client, 6))
    data["fields"]["sender"] = "mallory@example.jp"
    body = {k: data[k] for k in ("seq", "time", "event", "queue_id", "message_id", "actor",
                                 "source", "fields")}
    data["hash"] = chain_hash(data["prev_hash"], body)
    client.zrem(RECORDS, _member(client, 6))
    client.zadd(RECORDS, {json.dumps(data): 6})
    assert log.verify().first_bad_seq == 7
    client.hset(TIP, "seq", 99)
    assert log.verify().first_bad_seq == 7  # still the first one
