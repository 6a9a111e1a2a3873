"""The review book on a real Redis: the whole contract of tests/unit/test_review_book.py,
deciders in separate processes (each review decided once), and a record never put back
among the pending ones by a create that reuses its ID."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import redis

from milters.core.config import load_config
from milters.core.errors import ReviewError
from milters.core.review import ReviewBook, open_review_book
from milters.core.review.redis_book import PENDING, PREFIX, RedisReviewBook
from tests.harness.redis_server import RedisServer
from tests.unit.test_review_book import SENDER, T0, BookContract, review
from tests.unit.test_review_book_concurrency import race

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    made = redis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    _forget(made)  # the server is shared by the run: only our keys
    yield made
    _forget(made)
    made.close()


def _forget(client: redis.Redis) -> None:
    for key in client.scan_iter(match=PREFIX + "*"):
        client.delete(key)


def _config(tmp_path: Path, redis_server: RedisServer) -> Path:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store: {redis_server.url}\n")
    return config


class TestRedisBook(BookContract):
    @pytest.fixture
    def book(self, tmp_path: Path, redis_server: RedisServer,
             client: redis.Redis) -> Iterator[ReviewBook]:
        made = open_review_book(load_config(_config(tmp_path, redis_server)))
        assert isinstance(made, RedisReviewBook)
        yield made
        made.close()


def test_processes_deciding_on_one_redis_each_review_once(
        tmp_path: Path, redis_server: RedisServer, client: redis.Redis) -> None:
    race(_config(tmp_path, redis_server), tmp_path)


def test_a_create_with_a_taken_id_leaves_the_decided_record_alone(
        tmp_path: Path, redis_server: RedisServer, client: redis.Redis) -> None:
    book = open_review_book(load_config(_config(tmp_path, redis_server)))
    record = book.create(review())
    book.decide(record.id, SENDER, "s", "cancel", now=T0)
    with pytest.raises(ReviewError, match="exists"):
        book.create(record)
    assert client.zscore(PENDING, record.id) is None  # not pending again
    assert book.due(T0 + 10**6) == [] and book.get(record.id).state == "cancelled"


def test_a_record_changed_behind_the_book_is_read_as_it_is_now(
        tmp_path: Path, redis_server: RedisServer, client: redis.Redis) -> None:
    # Two gateways: one decides, the other's view follows (nothing cached in a process).
    config = _config(tmp_path, redis_server)
    one, two = (open_review_book(load_config(config)) for _ in range(2))
    record = one.create(review("confirm"))
    assert two.get(record.id) == record
    one.decide(record.id, SENDER, "s", "confirm", now=T0)
    assert two.get(record.id).state == "sent" and two.pending_for(SENDER).as_sender == []
