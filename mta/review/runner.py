"""The review runner in serve's loop: timers (timers.py) and carrying out decisions.

Each round (about a second):
  - reviews whose deadline passed: the next approver's turn (escalate, with a notice) or the
    timer's decision (`timeout`: sent, or expired), as timers.py does for every runner;
  - held messages an admin released (`mailmoat queue release`, the console): their review is
    decided send_now on the admin's behalf, then carried out as below;
  - decided reviews not yet carried out whose message is in this gateway's queue: sent or
    approved -> the message runs through the milters after the one that held it and is
    queued for delivery (resume.py); cancelled, rejected or expired -> the sender gets the
    result notice and the message is deleted. Each is marked carried out in the book
    (carry_out), so nothing is done twice, also across a restart: the deadlines and the
    decisions are in the book, not in this process.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from milters.core.errors import ReviewRefused
from milters.core.eventlog import log_event
from milters.core.reinject import reinject
from milters.core.review import parse_review_reason
from milters.core.review.record import ReviewRecord

from mta.chain.session import ChainMember, ChainSession
from mta.queue.spool import RESUME_AFTER, RESUME_REQUESTED, Envelope, NoSuchMessage, Queue
from .resume import ResumeFailed, finish_resumes, remove_resumed, resume
from .timers import DROP, RELEASE, Send, ReviewTimers


class ReviewRunner(ReviewTimers):
    def __init__(self, *, queue: Queue, book: Any, members: list[ChainMember],
                 chain_for: Callable[[list[ChainMember]], ChainSession], hostname: str,
                 reinject_listen: str, notices: Any,
                 issue_link: Callable[[str, str, str, float], str] | None = None,
                 send: Send = reinject, clock: Callable[[], float] = time.time,
                 on_queued: Callable[[str], None] | None = None,
                 retention: float = 0.0) -> None:
        super().__init__(book=book, reinject_listen=reinject_listen, notices=notices,
                         issue_link=issue_link, send=send, clock=clock, retention=retention)
        self.queue, self.members, self.chain_for = queue, members, chain_for
        self.hostname, self.on_queued = hostname, on_queued

    async def _carry_out_round(self) -> None:
        for envelope in self.queue.entries():
            if envelope.hold_reason and envelope.extra.get(RESUME_REQUESTED):
                await self._requested(envelope)
        for record in await self.books.undone():
            await self._carry_out(record)

    # -- the steps ------------------------------------------------------------------------
    async def _recover(self) -> None:
        """After a crash: the copies resumed before it replace their held originals, and a
        held message whose review was carried out already goes."""
        for old in finish_resumes(self.queue):
            log_event("review_resume_finished", queue_id=old.queue_id)
            found = parse_review_reason(old.hold_reason)
            record = await self.books.get(found[1]) if found else None
            if record is not None and record.state != "pending":
                await self._mark(record)
        for envelope in self.queue.entries():
            found = parse_review_reason(envelope.hold_reason)
            if found is None:
                continue
            record = await self.books.get(found[1])
            if record is not None and record.carried_out:
                remove_resumed(self.queue, envelope.queue_id)
                log_event("review_leftover_removed", queue_id=envelope.queue_id,
                          review=record.id, state=record.state)

    async def _requested(self, envelope: Envelope) -> None:
        """An admin released a message held for review: decided send_now on their behalf
        (the book keeps who), carried out in this round."""
        found = parse_review_reason(envelope.hold_reason)
        record = await self.books.get(found[1]) if found else None
        if record is None or record.queue_id != envelope.queue_id:
            # No review left to decide, or a copy split off for some recipients: released
            # through the rest of the chain; the review stays with the original.
            await self._release(envelope.queue_id, None)
            return
        who = envelope.extra.get(RESUME_REQUESTED, "admin")
        action = {"delay": "send_now", "confirm": "confirm", "approve": "approve"}[record.kind]
        try:
            await self.books.decide(record.id, who, "queue", action,
                                    "released from the queue",
                                    now=max(self.clock(), record.created), override=True)
        except ReviewRefused as exc:
            if exc.reason in ("decided", "expired", "self_approval"):
                # Past its deadline or already decided: the admin's release still wins.
                await self._release(envelope.queue_id, record)
            else:
                log_event("review_release_refused", queue_id=envelope.queue_id,
                          review=record.id, reason=exc.reason)

    async def _carry_out(self, record: ReviewRecord) -> None:
        try:
            envelope = self.queue.envelope(record.queue_id)
        except NoSuchMessage:
            return  # another gateway's message (a shared Redis book): that one does it
        if parse_review_reason(envelope.hold_reason) != (record.kind, record.id):
            return  # not the message this review holds
        if record.state in RELEASE:
            await self._release(record.queue_id, record)
        elif record.state in DROP:
            await self._drop(record)

    async def _release(self, queue_id: str, record: ReviewRecord | None) -> None:
        try:
            done = await resume(self.queue, queue_id, self.members, self.chain_for,
                                self.hostname)
        except ResumeFailed as exc:
            log_event("review_release_failed", level=logging.WARNING, queue_id=queue_id,
                      error=str(exc), action="stays held")
            return
        await self._mark(record)
        remove_resumed(self.queue, queue_id)
        log_event("review_released", queue_id=queue_id, new_queue_id=done.new_id,
                  review=record.id if record else None, held=done.held)
        if done.new_id and self.on_queued is not None:
            self.on_queued(done.new_id)

    async def _drop(self, record: ReviewRecord) -> None:
        await self._tell_sender(record)
        await self._mark(record)
        remove_resumed(self.queue, record.queue_id)
        log_event("review_dropped", queue_id=record.queue_id, review=record.id,
                  state=record.state)


__all__ = ["RESUME_AFTER", "ReviewRunner"]
