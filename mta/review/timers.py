"""What every review runner does, whoever holds the messages (serve's queue, or Postfix's
hold queue): each round (about a second) the reviews whose deadline passed get the next
approver's turn (escalate, with a notice) or the timer's decision; then the runner's own
part (`_recover` once, `_carry_out_round` each round) releases or drops held messages.
The deadlines and decisions live in the book, so a restart neither loses nor repeats one.
"""
from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
import os
import time
from typing import Any, Callable

from milters.core.errors import MailmoatError, ReviewRefused
from milters.core.eventlog import log_event
from milters.core.reinject import reinject
from milters.core.review import SqliteReviewBook
from milters.core.review.record import TIMER, ReviewRecord

RELEASE = ("sent", "approved")
DROP = ("cancelled", "rejected", "expired")
APPROVER_ACTIONS = ("approve", "reject")
Send = Callable[[str, str, list[str], bytes, float], str]
NOTICE_TIMEOUT = 30.0
PURGE_EVERY = 3600.0  # seconds between two purges of reviews past review.retention


class OffLoop:
    """Calls of an object (the review book) run in a worker thread: serve's SMTP sessions
    share the event loop, and a book waiting on SQLite's write lock or a slow Redis must not
    stall them."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Callable[..., Any]:
        call = getattr(self._target, name)

        async def off_loop(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(call, *args, **kwargs)
        return off_loop


class ReviewTimers(ABC):
    def __init__(self, *, book: Any, reinject_listen: str, notices: Any,
                 issue_link: Callable[[str, str, str, float], str] | None = None,
                 send: Send = reinject, clock: Callable[[], float] = time.time,
                 retention: float = 0.0) -> None:
        self.book, self.listen, self.notices = book, reinject_listen, notices
        self.issue_link, self.send, self.clock = issue_link, send, clock
        self.retention = retention  # review.retention; 0: keep every review
        self.books = OffLoop(book)  # the same book, awaited off the event loop
        self._purged_at: float | None = None
        self._started = False
        self._running: asyncio.Task[None] | None = None

    # -- the loop calls this each round ---------------------------------------------------
    def poke(self) -> None:
        """Start a round unless one is still running (a slow milter must not pile rounds)."""
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._round_logged())

    async def stop(self) -> None:
        if self._running is not None:
            await asyncio.wait([self._running], timeout=30)

    async def _round_logged(self) -> None:
        try:
            await self.round()
        except (MailmoatError, OSError) as exc:  # the book or the spool: next round again
            log_event("review_runner_failed", level=logging.ERROR, error=str(exc))

    def in_use(self) -> bool:
        """A SQLite book the review milter never made means no reviews: no file made here."""
        if isinstance(self.book, SqliteReviewBook):
            return os.path.exists(self.book.path)
        return True

    async def round(self) -> None:
        if not self.in_use():
            return
        if not self._started:
            await self._recover()
            self._started = True
        now = self.clock()
        for record in await self.books.due(now):
            await self._timer(record, now)
        await self._carry_out_round()
        await self._purge(now)

    async def _purge(self, now: float) -> None:
        """Once an hour (and at the first round): forget reviews carried out longer ago than
        review.retention, so the book does not grow without bound."""
        if self.retention <= 0 or (self._purged_at is not None
                                   and now - self._purged_at < PURGE_EVERY):
            return
        self._purged_at = now
        removed = await self.books.purge(now - self.retention)
        if removed:
            log_event("review_purged", removed=removed, before=int(now - self.retention))

    # -- the holder's part ----------------------------------------------------------------
    async def _recover(self) -> None:
        """Once, at the first round: finish what a crash left half done."""

    @abstractmethod
    async def _carry_out_round(self) -> None:
        """Release or drop the held messages whose reviews are decided (serve's queue, or
        Postfix's hold queue)."""

    # -- shared steps ---------------------------------------------------------------------
    async def _timer(self, record: ReviewRecord, now: float) -> None:
        try:
            if record.on_timeout == "escalate" and record.step + 1 < len(record.approvers):
                new = await self.books.escalate(record.id, now=now)
                log_event("review_escalated", queue_id=record.queue_id, review=record.id,
                          approver=new.approver, deadline=int(new.deadline))
                await self._notify_approver(new)
            else:
                new = await self.books.decide(record.id, TIMER, TIMER, "timeout", now=now)
                log_event("review_timed_out", queue_id=record.queue_id, review=record.id,
                          state=new.state)
        except ReviewRefused as exc:  # decided meanwhile (the console, another gateway)
            log_event("review_timer_skipped", queue_id=record.queue_id, review=record.id,
                      reason=exc.reason)

    async def _notify_approver(self, record: ReviewRecord) -> None:
        approver = record.approver
        if approver is None or self.issue_link is None:
            return
        links = {action: self.issue_link(record.id, approver, action, record.deadline)
                 for action in APPROVER_ACTIONS}
        raw = self.notices.render_for_approver(record, approver, links, record.language)
        await self._send([approver], raw)

    async def _tell_sender(self, record: ReviewRecord) -> None:
        """The result notice of a cancelled, rejected or expired review."""
        await self._send([record.sender], self.notices.render_result(record))

    async def _mark(self, record: ReviewRecord | None) -> None:
        if record is None:
            return
        try:
            await self.books.carry_out(record.id, now=self.clock())
        except ReviewRefused as exc:
            log_event("review_mark_skipped", review=record.id, reason=exc.reason)

    async def _send(self, to: list[str], raw: bytes, mail_from: str = "") -> None:
        # In a thread: the re-injection listener this talks to may run on this very loop.
        await asyncio.to_thread(self.send, self.listen, mail_from, to, raw, NOTICE_TIMEOUT)
