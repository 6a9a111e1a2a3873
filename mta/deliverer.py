"""One delivery pass over the queue: try what is due, record each recipient's outcome,
retry on the configured schedule, bounce permanent failures and mail past its maximum age,
and remove what is done. Every step is logged with the queue ID."""
from __future__ import annotations

import logging
import time

from milters.core.config import QueueSettings
from milters.core.eventlog import log_event

from .bounce import build_bounce
from .delivery import BOUNCED, DELIVERED, Agent, Router
from .metrics import METRICS
from .queue import Envelope, Queue, RecipientState, SpoolError, StoredMessage, new_queue_id


def next_wait(settings: QueueSettings, attempts: int) -> float:
    """The wait after the `attempts`-th failed attempt; the last step repeats."""
    return settings.retry[min(attempts, len(settings.retry)) - 1]


def _bounce(queue: Queue, envelope: Envelope, raw: bytes, failed: list[RecipientState],
            hostname: str, reason: str) -> None:
    if not envelope.sender:  # never bounce a bounce (RFC 5321 section 6.1)
        log_event("bounce_suppressed", queue_id=envelope.queue_id, reason="null sender")
        return
    notice = build_bounce(envelope, raw, failed, hostname, reason)
    bounce_id = queue.enqueue(notice, Envelope(new_queue_id(), "", [RecipientState(
        envelope.sender)], received_at=time.time(), extra={"bounce_of": envelope.queue_id}))
    log_event("bounced", queue_id=envelope.queue_id, bounce_id=bounce_id,
              to=envelope.sender, nrcpt=len(failed))


def deliver_one(queue: Queue, envelope: Envelope, router: Router, settings: QueueSettings,
                hostname: str, now: float, message: StoredMessage | None = None) -> None:
    """Try `envelope`'s pending recipients; `message` saves a second read of the spool file
    when the caller has it from Queue.load."""
    if message is None:
        message = queue.stored(envelope.queue_id)
    by_agent: dict[int, tuple[Agent, list[RecipientState]]] = {}
    for rcpt in envelope.pending():
        agent = router.agent_for(rcpt.address)
        by_agent.setdefault(id(agent), (agent, []))[1].append(rcpt)
    newly_failed: list[RecipientState] = []
    for agent, rcpts in by_agent.values():
        outcomes = agent.deliver(envelope.sender, [r.address for r in rcpts], message)
        for rcpt in rcpts:
            outcome = outcomes[rcpt.address]
            rcpt.last_reply = outcome.reply
            if outcome.status in (DELIVERED, BOUNCED):
                rcpt.status = outcome.status
            if outcome.status == BOUNCED:
                newly_failed.append(rcpt)
            METRICS.count("mailmoat_deliveries_total", status=outcome.status)
            log_event(outcome.status, queue_id=envelope.queue_id, to=rcpt.address,
                      reply=outcome.reply, attempt=envelope.attempts + 1)
    envelope.attempts += 1
    expired = now - envelope.received_at >= settings.max_age
    if expired and envelope.pending():
        for rcpt in envelope.pending():
            rcpt.status = BOUNCED
            rcpt.last_reply = (f"{rcpt.last_reply} (gave up after {envelope.attempts} "
                               f"attempts)" if rcpt.last_reply else "message expired")
            newly_failed.append(rcpt)
        log_event("expired", queue_id=envelope.queue_id, attempts=envelope.attempts)
    if newly_failed:
        _bounce(queue, envelope, queue.message(envelope.queue_id), newly_failed, hostname,
                "message expired" if expired else "permanent failure")
    if envelope.pending():
        envelope.next_attempt = now + next_wait(settings, envelope.attempts)
        queue.update(envelope)
        log_event("deferred", queue_id=envelope.queue_id,
                  next_attempt=round(envelope.next_attempt - now), pending=len(envelope.pending()))
    else:
        queue.remove(envelope.queue_id)
        log_event("removed", queue_id=envelope.queue_id)


def deliver_due(queue: Queue, router: Router, settings: QueueSettings, hostname: str,
                now: float | None = None) -> int:
    """Try every message that is due; returns how many were tried."""
    now = time.time() if now is None else now
    due = queue.due(now)
    for envelope in due:
        try:
            deliver_one(queue, envelope, router, settings, hostname, now)
        except SpoolError as exc:  # cannot record the outcome: try again next pass
            log_event("spool_error", level=logging.ERROR, queue_id=envelope.queue_id,
                      error=str(exc))
    return len(due)
