"""One delivery pass over the queue: try what is due, record each recipient's outcome,
retry on the configured schedule, bounce permanent failures and mail past its maximum age,
and remove what is done. Every step is logged with the queue ID.

An unexpected error while delivering a message (a bug, a library raising what it should
not) is a failed attempt like a 4xx (DESIGN.md section 8): logged with the queue ID,
retried on the schedule, bounced at max_age. It never leaves the message due, which would
repeat the error at every scan of the queue.
"""
from __future__ import annotations

import logging
import time

from milters.core.config import QueueSettings
from milters.core.eventlog import log_event

from mta.metrics import METRICS
from mta.queue.spool import (Envelope, NoSuchMessage, Queue, RecipientState, SpoolError,
                             StoredMessage, new_queue_id)
from . import smtputf8
from .agent import BOUNCED, DEFERRED, DELIVERED, Agent, DeliveryOptions, Outcome
from .bounce import build_bounce
from .routing import Router

INTERNAL_ERROR = "451 4.3.0 internal error while delivering"  # Postfix: 4.3.0, deferred


def next_wait(settings: QueueSettings, attempts: int) -> float:
    """The wait after the `attempts`-th failed attempt; the last step repeats."""
    return settings.retry[min(attempts, len(settings.retry)) - 1]


def _failure_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


def _bounce(queue: Queue, envelope: Envelope, raw: bytes, failed: list[RecipientState],
            hostname: str, reason: str) -> None:
    if not envelope.sender:  # never bounce a bounce (RFC 5321 section 6.1)
        log_event("bounce_suppressed", queue_id=envelope.queue_id, reason="null sender")
        return
    try:
        notice = build_bounce(envelope, raw, failed, hostname, reason)
    except Exception as exc:  # the original's headers could not be quoted: send it without
        log_event("bounce_error", level=logging.ERROR, queue_id=envelope.queue_id,
                  error=_failure_text(exc), action="bounce without the original headers")
        notice = build_bounce(envelope, b"", failed, hostname, reason)
    extra = {"bounce_of": envelope.queue_id}
    if smtputf8.requested(envelope):
        extra[smtputf8.REQUESTED] = "yes"  # the sender's address may need it
    bounce_id = queue.enqueue(notice, Envelope(new_queue_id(), "", [RecipientState(
        envelope.sender)], received_at=time.time(), extra=extra))
    log_event("bounced", queue_id=envelope.queue_id, bounce_id=bounce_id,
              to=envelope.sender, nrcpt=len(failed))


def _attempt(agent: Agent, envelope: Envelope, addresses: list[str], message: StoredMessage,
             options: DeliveryOptions) -> dict[str, Outcome]:
    """The agent's outcome for each address. Whatever it raises, or an address it gives no
    outcome for, is a deferral (a failed attempt) for those addresses, logged."""
    try:
        outcomes = dict(agent.deliver(envelope.sender, addresses, message, options))
        missing = [address for address in addresses if address not in outcomes]
        if missing:
            log_event("delivery_error", level=logging.ERROR, queue_id=envelope.queue_id,
                      agent=type(agent).__name__, error="no outcome", nrcpt=len(missing))
    except Exception as exc:
        log_event("delivery_error", level=logging.ERROR, queue_id=envelope.queue_id,
                  agent=type(agent).__name__, error=_failure_text(exc))
        outcomes = {}
    failed = Outcome(DEFERRED, INTERNAL_ERROR)
    return {address: outcomes.get(address, failed) for address in addresses}


def deliver_one(queue: Queue, envelope: Envelope, router: Router, settings: QueueSettings,
                hostname: str, now: float, message: StoredMessage | None = None) -> None:
    """Try `envelope`'s pending recipients; `message` saves a second read of the spool file
    when the caller has it from Queue.load."""
    if message is None:
        message = queue.stored(envelope.queue_id)
    options = DeliveryOptions(envelope.queue_id, smtputf8.requested(envelope))
    by_agent: dict[int, tuple[Agent, list[RecipientState]]] = {}
    outcomes: dict[str, Outcome] = {}
    for rcpt in envelope.pending():
        try:
            agent = router.agent_for(rcpt.address)
        except Exception as exc:
            log_event("delivery_error", level=logging.ERROR, queue_id=envelope.queue_id,
                      to=rcpt.address, error=_failure_text(exc))
            outcomes[rcpt.address] = Outcome(DEFERRED, INTERNAL_ERROR)
            continue
        by_agent.setdefault(id(agent), (agent, []))[1].append(rcpt)
    for agent, rcpts in by_agent.values():
        outcomes.update(_attempt(agent, envelope, [r.address for r in rcpts], message, options))
    newly_failed: list[RecipientState] = []
    for rcpt in envelope.pending():
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
    _settle(queue, envelope, newly_failed, settings, hostname, now)


def _settle(queue: Queue, envelope: Envelope, newly_failed: list[RecipientState],
            settings: QueueSettings, hostname: str, now: float) -> None:
    """After an attempt: bounce what failed for good or is past max_age, then schedule the
    next attempt or remove the message."""
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


def deliver_safely(queue: Queue, envelope: Envelope, router: Router, settings: QueueSettings,
                   hostname: str, now: float, message: StoredMessage | None = None) -> None:
    """deliver_one; should it raise anyway (outside the agents, which _attempt guards),
    the attempt is recorded as failed from the envelope on disk. Raises only what stops
    recording too (SpoolError), or NoSuchMessage when the message is gone."""
    try:
        deliver_one(queue, envelope, router, settings, hostname, now, message)
    except (SpoolError, NoSuchMessage):
        raise
    except Exception as exc:
        log_event("delivery_error", level=logging.ERROR, queue_id=envelope.queue_id,
                  error=_failure_text(exc))
        _record_failed_attempt(queue, envelope.queue_id, settings, hostname, now)


def _record_failed_attempt(queue: Queue, queue_id: str, settings: QueueSettings,
                           hostname: str, now: float) -> None:
    envelope = queue.envelope(queue_id)  # as on disk: what deliver_one changed is unsure
    for rcpt in envelope.pending():
        rcpt.last_reply = INTERNAL_ERROR
    envelope.attempts += 1
    try:
        _settle(queue, envelope, [], settings, hostname, now)
        return
    except (SpoolError, NoSuchMessage):
        raise
    except Exception as exc:  # past max_age and its bounce failed too: retry both later
        log_event("expire_error", level=logging.ERROR, queue_id=queue_id,
                  error=_failure_text(exc))
    envelope = queue.envelope(queue_id)
    envelope.attempts += 1
    envelope.next_attempt = now + next_wait(settings, envelope.attempts)
    queue.update(envelope)
    log_event("deferred", queue_id=queue_id, next_attempt=round(envelope.next_attempt - now),
              pending=len(envelope.pending()))


def deliver_due(queue: Queue, router: Router, settings: QueueSettings, hostname: str,
                now: float | None = None) -> int:
    """Try every message that is due; returns how many were tried."""
    now = time.time() if now is None else now
    due = queue.due(now)
    for envelope in due:
        try:
            deliver_safely(queue, envelope, router, settings, hostname, now)
        except NoSuchMessage:
            pass  # removed meanwhile
        except SpoolError as exc:  # cannot record the outcome: try again next pass
            log_event("spool_error", level=logging.ERROR, queue_id=envelope.queue_id,
                      error=str(exc))
    return len(due)
