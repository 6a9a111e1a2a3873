"""Outbound review: held mail waiting for a delay, the sender's confirmation or an approval.

    book = open_review_book(config)
    record = book.create(new_review(queue_id=qid, kind="delay", sender=..., recipients=...,
                                    subject=..., now=now, timeout=300))
    reason = review_reason(record)                   # the quarantine reason of the message
    key = load_token_key(config.review.token_key_file)
    url = link(console_url(config), issue(key, record.id, record.sender, "cancel", expires))
    raw = notices_for(config).render_for_sender(record, {"cancel": url, ...}, "ja")
    book.decide(record.id, record.sender, "192.0.2.9", "cancel", token_id=claims.token_id)

Backends: SQLite (a file beside the store's, or `review.file`), Redis (redis:// stores: the
gateways share the reviews), memory (memory:// stores: tests). All keep the same rules
(record.py) and the same contract (base.py).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StoreError
from .base import DUE_LIMIT, PendingFor, ReviewBook
from .memory_book import MemoryReviewBook
from .notices import ReviewNotices
from .record import (ACTIONS, KINDS, ON_TIMEOUT, STATES, TIMER, Decision, ReviewRecord,
                     new_review)
from .sqlite_book import SqliteReviewBook
from .tokens import Claims, issue, link, load_token_key, verify

if TYPE_CHECKING:
    from ..config import GatewayConfig

# The quarantine reason of a held message: "mailmoat-review KIND ID". The queue and the
# console find the review of a held message by it.
REVIEW_REASON_PREFIX = "mailmoat-review"
# The header the review milter marks a held message with; removed when it is released (the
# review ID must not leave the gateway).
REVIEW_HEADER = "X-Mailmoat-Review"
_REASON = re.compile(rf"{REVIEW_REASON_PREFIX} (delay|confirm|approve) ([0-9a-f]{{32}})\Z")


def review_reason(record: ReviewRecord) -> str:
    return f"{REVIEW_REASON_PREFIX} {record.kind} {record.id}"


def parse_review_reason(reason: str | None) -> tuple[str, str] | None:
    """(kind, review ID) of a quarantine reason we wrote, or None for any other text."""
    match = _REASON.match((reason or "").strip())
    return (match.group(1), match.group(2)) if match else None


def open_review_book(config: "GatewayConfig") -> ReviewBook:
    """The review book the config's `store:` and `review.file` name (no connection yet)."""
    store = config.store
    if config.review.file is not None:
        return SqliteReviewBook(str(config.review.file))
    if store == "memory://":
        return MemoryReviewBook()
    if store.startswith("sqlite:///"):
        return SqliteReviewBook(str(beside_store(store[len("sqlite:///"):])))
    if store.startswith(("redis://", "rediss://")):
        return _open_redis(config)
    raise StoreError(f"the review book cannot be kept in store {store.split(':')[0]}:")


def beside_store(store_path: str) -> Path:
    """The review book's own file next to the store's (state.db -> state-review.db)."""
    path = Path(store_path)
    return path.with_name(f"{path.stem}-review{path.suffix or '.db'}")


def console_url(config: "GatewayConfig") -> str:
    """Where review links point: review.console_url, else the console's own listen."""
    if config.review.console_url:
        return config.review.console_url
    scheme = "https" if config.console.tls else "http"
    return f"{scheme}://{config.console.listen}"


def notice_from(config: "GatewayConfig") -> str:
    return config.review.notice_from or f"mailmoat-review@{config.hostname}"


def notices_for(config: "GatewayConfig") -> ReviewNotices:
    return ReviewNotices(notice_from(config), config.hostname)


def _open_redis(config: "GatewayConfig") -> ReviewBook:
    from ..store import redis_client
    from .redis_book import RedisReviewBook

    client, where = redis_client(config, "review book")
    return RedisReviewBook(client, where)


__all__ = ["ACTIONS", "Claims", "DUE_LIMIT", "Decision", "KINDS", "MemoryReviewBook",
           "ON_TIMEOUT", "PendingFor", "REVIEW_HEADER", "REVIEW_REASON_PREFIX", "ReviewBook",
           "ReviewNotices", "ReviewRecord", "STATES", "SqliteReviewBook", "TIMER", "beside_store",
           "console_url", "issue", "link", "load_token_key", "new_review", "notice_from",
           "notices_for", "open_review_book", "parse_review_reason", "review_reason",
           "verify"]
