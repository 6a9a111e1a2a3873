"""The review runner behind Postfix (`mailmoat postfix-review`).

Postfix ends the milter chain at a hold: the review milter's quarantine puts the message in
Postfix's hold queue as the sender wrote it, and the milters after it (the attachments
milter's ZIP and password notice, signing) do not run. The recipe's `milter_header_checks`
line gives every message the review milter marks (`X-Mailmoat-Review`) a content filter: the
release port, an smtpd running just those later milters. So however the message leaves the
hold queue (this runner's `postsuper -H`, or an admin's), it goes through them first: the ZIP
and its password are made on release, never for a cancelled message, and never skipped.

Each round (about a second), besides the timers (timers.py):
  - pending reviews: a message seen in the hold queue is remembered; one an admin released by
    hand (now in the deferred or active queue) has its review decided on the admin's behalf
    (who `postsuper`, source `postfix`) and is delivered now (`postqueue -i`); one gone from
    every queue (`postsuper -d`, or released and delivered between two rounds) has its
    review withdrawn;
  - decided reviews: sent or approved -> `postsuper -H` then `postqueue -i`; cancelled,
    rejected or expired -> `postsuper -d ID hold` and the sender is told. Then the review
    is marked carried out. A Postfix command that fails is tried again next round.

A review is this host's while its message is in this Postfix's queue (or was, in this
runner's life): with a book shared in Redis, each gateway's runner handles its own messages.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from milters.core.errors import MailmoatError, ReviewRefused
from milters.core.eventlog import log_event
from milters.core.review.record import ReviewRecord

from .postfix_queue import PostfixQueue
from .timers import DROP, RELEASE, ReviewTimers

HOLD = "hold"
RELEASED = "released"  # taken out of hold this round (postsuper -H -), to deliver now
RECEIVING = "incoming"  # also where a message is while Postfix still writes it
BY_HAND = ("postsuper", "postfix")  # who and source of a decision taken by hand in Postfix
ACTION_ON_RELEASE = {"delay": "send_now", "confirm": "confirm", "approve": "approve"}


class PostfixReviewRunner(ReviewTimers):
    def __init__(self, *, postfix: PostfixQueue, **timers: Any) -> None:
        super().__init__(**timers)
        self.postfix = postfix
        self.seen: set[str] = set()  # review IDs whose message this runner saw on hold

    async def _carry_out_round(self) -> None:
        listing = await asyncio.to_thread(self.postfix.listing)
        for record in await self.books.pending():
            await self._watch(record, listing.get(record.queue_id))
        undone = await self.books.undone()
        await self._release_together(undone, listing)
        for record in undone:
            await self._carry_out(record, listing.get(record.queue_id))

    async def _release_together(self, undone: list[ReviewRecord],
                                listing: dict[str, str]) -> None:
        """Every decided release on hold out of it in one postsuper (an approver who
        approves fifty from a digest: one process, not fifty); each is then delivered and
        marked by _carry_out. Whatever it did not release stays on hold for _carry_out."""
        ids = [r.queue_id for r in undone
               if r.state in RELEASE and listing.get(r.queue_id) == HOLD]
        if len(ids) < 2:
            return
        try:
            released = await asyncio.to_thread(self.postfix.release_many, ids)
        except (MailmoatError, OSError) as exc:
            log_event("review_carry_out_failed", level=logging.WARNING, state="approved",
                      error=str(exc), action="one at a time")
            return
        for queue_id in released:
            listing[queue_id] = RELEASED

    def _gone(self, record: ReviewRecord) -> bool:
        """Not in the queue, though this runner saw it on hold. One it never saw may be
        another gateway's (a shared book) or still in its SMTP session: left alone."""
        return record.id in self.seen

    async def _watch(self, record: ReviewRecord, where: str | None) -> None:
        """A pending review: note its message on hold, or see what an admin did to it."""
        if where == HOLD:
            self.seen.add(record.id)
            return
        if where == RECEIVING or (where is None and not self._gone(record)):
            return
        self.seen.discard(record.id)
        who, source = BY_HAND
        try:
            if where is not None:  # postsuper -H: the admin's release decides the review
                await self.books.decide(record.id, who, source,
                                        ACTION_ON_RELEASE[record.kind],
                                        "released from Postfix's hold queue",
                                        now=max(self.clock(), record.created), override=True)
                log_event("review_released_by_hand", queue_id=record.queue_id,
                          review=record.id, queue=where)
            else:
                await self.books.withdraw(record.id, who, source,
                                          "left Postfix's hold queue (postsuper -d, or -H "
                                          "and delivered at once)", now=self.clock())
                log_event("review_withdrawn", level=logging.WARNING, queue_id=record.queue_id,
                          review=record.id, reason="gone from Postfix's queue")
        except ReviewRefused as exc:  # decided meanwhile: carried out below
            log_event("review_by_hand_skipped", queue_id=record.queue_id, review=record.id,
                      reason=exc.reason)

    async def _carry_out(self, record: ReviewRecord, where: str | None) -> None:
        if where in (HOLD, RELEASED):
            # Ours: should a step below fail after postsuper acted, the next round finds
            # the message gone and still knows it was this host's to finish.
            self.seen.add(record.id)
        if where == RECEIVING or (where is None and not self._gone(record)):
            return
        try:
            if where == HOLD and record.state in RELEASE:
                await asyncio.to_thread(self.postfix.release, record.queue_id)
            elif where == HOLD and record.state in DROP:
                await asyncio.to_thread(self.postfix.delete, record.queue_id)
                await self._tell_sender(record)
            elif where is not None:  # released above, or by hand: deliver it now
                await asyncio.to_thread(self.postfix.deliver_now, record.queue_id)
            elif record.state in DROP:  # deleted by hand after the decision: it did not go
                await self._tell_sender(record)
        except (MailmoatError, OSError) as exc:
            log_event("review_carry_out_failed", level=logging.WARNING,
                      queue_id=record.queue_id, review=record.id, state=record.state,
                      error=str(exc), action="tried again next round")
            return
        await self._mark(record)
        self.seen.discard(record.id)
        event = "review_released" if record.state in RELEASE or where not in (None, HOLD) \
            else "review_dropped"
        log_event(event, queue_id=record.queue_id, review=record.id, state=record.state,
                  queue=HOLD if where == RELEASED else where or "gone")


def postfix_review_runner(config: Any, postfix: PostfixQueue,
                          clock: Callable[[], float] | None = None) -> PostfixReviewRunner:
    """The runner over the config's review book, notices and link key."""
    from milters.core.review import (console_url, issue, link, load_token_key,  # noqa: PLC0415
                                     notices_for, open_review_book)

    url, key = console_url(config), load_token_key(config.review.token_key_file)

    def issue_link(review_id: str, person: str, action: str, expires: float) -> str:
        return link(url, issue(key, review_id, person, action, expires))

    extra = {"clock": clock} if clock is not None else {}
    return PostfixReviewRunner(postfix=postfix, book=open_review_book(config),
                               reinject_listen=config.reinject_listen,
                               notices=notices_for(config), issue_link=issue_link,
                               retention=config.review.retention, **extra)
