"""serve's review runner, built from the gateway config (a few lines in serve.py)."""
from __future__ import annotations

from typing import Callable

from milters.core.config import GatewayConfig
from milters.core.review import (console_url, issue, link, load_token_key, notices_for,
                                 open_review_book)

from mta.chain.pool import MilterPool
from mta.chain.session import ChainMember, ChainSession
from mta.queue.spool import Queue
from .runner import ReviewRunner


def review_runner(config: GatewayConfig, queue: Queue, members: list[ChainMember],
                  pool: MilterPool, on_queued: Callable[[str], None] | None) -> ReviewRunner:
    url = console_url(config)
    key: list[bytes] = []

    def issue_link(review_id: str, person: str, action: str, expires: float) -> str:
        if not key:  # read (or made) only when an escalation first needs a link
            key.append(load_token_key(config.review.token_key_file))
        return link(url, issue(key[0], review_id, person, action, expires))

    return ReviewRunner(queue=queue, book=open_review_book(config), members=members,
                        chain_for=lambda rest: ChainSession(rest, pool=pool),
                        hostname=config.hostname, reinject_listen=config.reinject_listen,
                        notices=notices_for(config), issue_link=issue_link,
                        on_queued=on_queued, retention=config.review.retention)
