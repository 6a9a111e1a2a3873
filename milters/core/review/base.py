"""The review book: where review records live, one interface over memory, SQLite and Redis.

Every change goes through `_change`: one transaction per backend (a lock, BEGIN IMMEDIATE,
WATCH/MULTI) that reads the record, checks the link's token was not used, applies one rule
of record.py and writes the result and the token's used mark together. Two people deciding
at once: the second one reads the first one's result and is refused ("already decided").
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from ..errors import ReviewError, ReviewRefused
from .record import (ACTIONS, ID_PATTERN, ReviewRecord, _with, carried, check, decided,
                     escalated, involves)

Change = Callable[[ReviewRecord], ReviewRecord]
DUE_LIMIT = 1000  # records one due() call returns: the timer takes the rest next round


@dataclass(frozen=True)
class PendingFor:
    """One person's pending reviews: the messages they sent that wait, and the ones that
    wait for their decision."""

    as_sender: list[ReviewRecord]
    as_approver: list[ReviewRecord]


class ReviewBook(ABC):
    def create(self, record: ReviewRecord) -> ReviewRecord:
        """Keep a new pending record; ReviewError if it is malformed or its ID is taken."""
        check(record)
        if record.state != "pending" or record.decisions:
            raise ReviewError("review record: a new record is pending with no decisions")
        self._insert(record)
        return record

    def get(self, review_id: str) -> ReviewRecord | None:
        """The record, or None (also for text that is no review ID at all)."""
        if not isinstance(review_id, str) or not ID_PATTERN.match(review_id):
            return None
        return self._load(review_id)

    def decide(self, review_id: str, who: str, source: str, action: str, reason: str = "",
               now: float | None = None, *, token_id: str | None = None,
               override: bool = False) -> ReviewRecord:
        """The record after `who` (an address; "timer" for action "timeout") took `action`
        from `source`; ReviewRefused (with .reason) when that may not happen. token_id: the
        link's token (tokens.Claims.token_id), marked used in the same transaction; a
        second use is refused ("token_used")."""
        if action not in ACTIONS and action != "timeout":
            raise ReviewRefused("wrong_action", f"unknown action {str(action)[:40]!r}")
        when = time.time() if now is None else now
        return self._change_known(review_id, token_id, lambda record: decided(
            record, who, source, action, reason, when, override=override))

    def escalate(self, review_id: str, now: float | None = None) -> ReviewRecord:
        """Hand a timed-out approval to its next approver, with a new deadline."""
        when = time.time() if now is None else now
        return self._change_known(review_id, None, lambda record: escalated(record, when))

    def due(self, now: float | None = None, limit: int = DUE_LIMIT) -> list[ReviewRecord]:
        """Pending records whose deadline has come, the earliest first."""
        return self._due(time.time() if now is None else now, max(int(limit), 0))

    def carry_out(self, review_id: str, now: float | None = None) -> ReviewRecord:
        """Mark a decided record carried out (the message released, or deleted and the
        sender told); ReviewRefused when it is pending or was marked already: of two
        gateways or a restarted timer, one marks it."""
        when = time.time() if now is None else now
        return self._change_known(review_id, None, lambda record: carried(record, when))

    def withdraw(self, review_id: str, who: str, source: str, reason: str = "",
                 now: float | None = None) -> ReviewRecord:
        """The message the review holds was deleted (queue delete, the console): a pending
        review is cancelled by `who` (past its deadline too: the message is gone) and every
        review is marked carried out, so neither the timer nor the runner finds it again.
        A review carried out already is returned as it is; ReviewRefused "unknown"."""
        when = time.time() if now is None else now
        return self._change_known(review_id, None, lambda record: withdrawn(
            record, who, source, reason, when))

    def undone(self, limit: int = DUE_LIMIT) -> list[ReviewRecord]:
        """Decided records not yet carried out, the earliest decided first."""
        found = self._undone(max(int(limit), 0))
        return sorted(found, key=lambda r: (r.decisions[-1].time if r.decisions else 0.0,
                                            r.id))[:max(int(limit), 0)]

    def pending(self, limit: int = DUE_LIMIT) -> list[ReviewRecord]:
        """Every pending record (an admin's list), the earliest deadline first, at most
        `limit` of them."""
        order = lambda r: (r.deadline, r.id)  # noqa: E731
        return sorted(self._pending(), key=order)[:max(int(limit), 0)]

    def pending_for(self, address: str) -> PendingFor:
        sent, to_decide = [], []
        for record in self._pending():
            is_sender, is_approver = involves(record, address)
            if is_sender:
                sent.append(record)
            if is_approver:
                to_decide.append(record)
        order = lambda r: (r.deadline, r.id)  # noqa: E731
        return PendingFor(sorted(sent, key=order), sorted(to_decide, key=order))

    def purge(self, before: float, limit: int = DUE_LIMIT) -> int:
        """Forget at most `limit` reviews carried out before `before` (and their used link
        tokens): review.retention. Pending and decided-but-not-carried-out ones stay. A link
        to a forgotten review gets the "unknown" page; the audit log keeps the decisions."""
        return self._purge(float(before), max(int(limit), 0))

    def token_used(self, review_id: str, token_id: str) -> bool:
        """Whether a link's token was already used (the confirmation page says so)."""
        if not isinstance(review_id, str) or not ID_PATTERN.match(review_id):
            return False
        return self._token_used(review_id, token_id)

    def close(self) -> None:
        """Let go of connections (the book may be used again: it reconnects)."""

    def _change_known(self, review_id: str, token_id: str | None,
                      change: Change) -> ReviewRecord:
        if not isinstance(review_id, str) or not ID_PATTERN.match(review_id):
            raise ReviewRefused("unknown", "no such review")
        return self._change(review_id, token_id, change)

    # -- the backend's primitives ----------------------------------------------------------
    @abstractmethod
    def _insert(self, record: ReviewRecord) -> None:
        """Store a new record; ReviewError when the ID exists."""

    @abstractmethod
    def _load(self, review_id: str) -> ReviewRecord | None: ...

    @abstractmethod
    def _change(self, review_id: str, token_id: str | None, change: Change) -> ReviewRecord:
        """In one transaction: read the record (ReviewRefused "unknown" if none), refuse a
        used token ("token_used"), write change(record) and the token's mark; return it."""

    @abstractmethod
    def _pending(self) -> Iterator[ReviewRecord]: ...

    @abstractmethod
    def _due(self, now: float, limit: int) -> list[ReviewRecord]: ...

    @abstractmethod
    def _undone(self, limit: int) -> list[ReviewRecord]: ...

    @abstractmethod
    def _token_used(self, review_id: str, token_id: str) -> bool: ...

    @abstractmethod
    def _purge(self, before: float, limit: int) -> int: ...


def withdrawn(record: ReviewRecord, who: str, source: str, reason: str,
              now: float) -> ReviewRecord:
    if record.carried_out:
        return record
    if record.state == "pending":
        record = _with(record, "cancelled", now, who, source, "cancel", reason)
    return replace(record, carried_out=float(now))


def refuse_unknown() -> ReviewRefused:
    return ReviewRefused("unknown", "no such review")


def refuse_used() -> ReviewRefused:
    return ReviewRefused("token_used", "this link was already used")
