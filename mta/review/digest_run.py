"""The digests of one gateway, built from its config: the review book's pending reviews and
the queue's quarantined mail, rendered and sent through the re-injection listener.

    digests = build_digests(config, now=time.time())        # [] when nothing waits
    raw = render(config, digests[0], now)                    # `mailmoat digest show`
    sent, failed = send_digests(config, digests, now)        # serve's timer, `digest send`

The queue is read bounded: the envelopes, and the first 64 KB of only the messages a digest
shows (mta.operations.held.read_head); never a whole 50 MB message.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from milters.core.config import GatewayConfig
from milters.core.config_review import DigestSettings
from milters.core.errors import MailmoatError
from milters.core.eventlog import log_event
from milters.core.reinject import reinject
from milters.core.review import (SqliteReviewBook, console_url, issue, link, load_token_key,
                                 notice_from, open_review_book, parse_review_reason)
from milters.core.review.digest import Digest, DigestBuilder, DigestRenderer

from mta.operations.held import read_head
from mta.queue.spool import NoSuchMessage, Queue

MAX_REVIEWS = 100_000  # pending reviews read per run (each person's lists are capped anyway)
SEND_TIMEOUT = 30.0
Send = Callable[[str, str, list[str], bytes, float], str]


def settings_of(config: GatewayConfig) -> DigestSettings:
    """review.digest, or its defaults (`digest send` works without the block: cron)."""
    return config.review.digest or DigestSettings()


def build_digests(config: GatewayConfig, *, now: float, only: str | None = None,
                  queue: Queue | None = None) -> list[Digest]:
    settings = settings_of(config)
    base = console_url(config)
    key: list[bytes] = []

    def issue_link(review_id: str, person: str, action: str, expires: float) -> str:
        if not key:  # read (or made, as the review milter would) only when a link is needed
            key.append(load_token_key(config.review.token_key_file))
        return link(base, issue(key[0], review_id, person, action, expires))

    builder = DigestBuilder(audiences=settings.to, max_items=settings.max_items,
                            domains=settings.domains or config.relay_domains,
                            issue_link=issue_link,
                            held_link=lambda queue_id: f"{base}/held/{queue_id}",
                            language=settings.language, only=only)
    _add_reviews(config, builder)
    queue = queue if queue is not None else _queue(config)
    if queue is not None:
        for envelope in reversed(queue.entries()):  # the newest first: a capped list shows them
            if envelope.hold_reason is None or parse_review_reason(envelope.hold_reason):
                continue  # not held, or a review hold (listed with its links above)
            pending = [r.address for r in envelope.pending()]
            builder.add_held(envelope.queue_id, envelope.sender, pending,
                             envelope.received_at, envelope.hold_reason)

    def subject_of(queue_id: str) -> str:
        try:
            return read_head(queue, queue_id).subject if queue is not None else ""
        except (OSError, NoSuchMessage):
            return ""  # released or deleted meanwhile

    return builder.digests(subject_of)


def _add_reviews(config: GatewayConfig, builder: DigestBuilder) -> None:
    book = open_review_book(config)
    try:
        # A SQLite book the review milter never made means no reviews: none made here.
        if isinstance(book, SqliteReviewBook) and not os.path.exists(book.path):
            return
        for record in book.pending(limit=MAX_REVIEWS):
            builder.add_review(record)
    finally:
        book.close()


def _queue(config: GatewayConfig) -> Queue | None:
    """serve's queue, when there is one (behind Postfix there is none: not made here)."""
    spool = Path(config.queue.dir)
    return Queue(spool) if (spool / "active").is_dir() else None


def renderer(config: GatewayConfig) -> DigestRenderer:
    return DigestRenderer(notice_from(config), config.hostname)


def render(config: GatewayConfig, digest: Digest, now: float) -> bytes:
    return renderer(config).render(digest, now)


def send_digests(config: GatewayConfig, digests: list[Digest], now: float,
                 send: Send = reinject) -> tuple[list[Digest], list[Digest]]:
    """Each digest to its person, null sender, through the re-injection listener; one
    failure is logged and the others still go. (sent, failed)."""
    sent, failed = [], []
    make = renderer(config)
    for digest in digests:
        reviews, approvals, held = digest.counts
        try:
            raw = make.render(digest, now)
            send(config.reinject_listen, "", [digest.person], raw, SEND_TIMEOUT)
        except (MailmoatError, OSError) as exc:
            log_event("digest_failed", level=logging.WARNING, person=digest.person,
                      error=str(exc)[:300])
            failed.append(digest)
            continue
        log_event("digest_sent", person=digest.person, language=digest.language,
                  reviews=reviews, approvals=approvals, held=held)
        sent.append(digest)
    return sent, failed


__all__ = ["build_digests", "render", "send_digests", "settings_of"]
