"""The operations on outbound reviews (issue 18): a review link's confirmation and decision,
and the console's list and decisions for logged-in people. The pages only translate
requests; what may be decided, by whom, is checked here and in the review book.

A link needs no login: its signed token is bound to one review, one person and one action
(milters/core/review/tokens.py); the book marks it used in the same transaction as the
decision. A console user decides as the address they own (the sender's or an approver's);
an admin may decide any review on someone's behalf (override); an auditor reads and
decides nothing. Every decision is an audit record `review_decided` with the actor
`review:PERSON` (a link) or `console:NAME` (a login), the source, the action and the reason.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from milters.core.errors import ReviewRefused, TokenInvalid
from milters.core.eventlog import log_event
from milters.core.review import (Claims, ReviewBook, ReviewRecord, load_token_key, open_review_book,
                                 verify)
from milters.core.review.record import APPROVER_ACTIONS, KIND_ACTIONS, SENDER_ACTIONS

from .access import ActorLike, Forbidden, NotFound, OperationError, actor_label, check_role

if TYPE_CHECKING:
    from milters.core.config import GatewayConfig

MAX_REASON = 2000  # characters of a rejection's reason kept (the book keeps as many)
_FORM_DOMAIN = b"mailmoat-review-form\x00"  # the form token: another use of the same key
MAX_LISTED = 500  # reviews on one console list


class ReviewLinkRefused(OperationError):
    """A review link cannot be used. `reason`: malformed, signature, expired, mismatch,
    token_used, decided, unknown, wrong_person, self_approval, wrong_action, form.
    `status` is the HTTP status a page answers with."""

    STATUS = {"malformed": 400, "signature": 400, "form": 403, "mismatch": 403,
              "wrong_person": 403, "self_approval": 403, "wrong_action": 400,
              "unknown": 404, "expired": 410, "token_used": 409, "decided": 409,
              "not_due": 409, "no_next_approver": 409}

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = self.STATUS.get(reason, 400)


@dataclass(frozen=True)
class LinkView:
    """What a review link's confirmation page shows: nothing here has been changed."""

    record: ReviewRecord
    person: str
    action: str
    expires: int


@dataclass(frozen=True)
class ReviewList:
    """A console person's pending reviews: theirs to withdraw or send, theirs to decide,
    and (admin and auditor) every pending review."""

    as_sender: list[ReviewRecord]
    as_approver: list[ReviewRecord]
    everyone: list[ReviewRecord]


class ReviewOperations:
    def __init__(self, book: ReviewBook, key: bytes | Callable[[], bytes],
                 audit: Any = None, clock: Callable[[], float] = time.time) -> None:
        # The key may be a loader: the console reads (or makes) the key file only when a
        # review link is first used, not on every gateway that never holds a review.
        self.book, self.audit, self.clock = book, audit, clock
        self._key = key if isinstance(key, bytes) else None
        self._load_key = None if isinstance(key, bytes) else key

    @property
    def key(self) -> bytes:
        if self._key is None:
            assert self._load_key is not None
            self._key = self._load_key()
        return self._key

    # -- links (no login: the token is the proof) ------------------------------------------
    def form_token(self, token: str) -> str:
        """The confirmation form's CSRF token: tied to the link's token, so a form made by
        another site (which does not know the link) cannot post a decision."""
        return hmac.new(self.key, _FORM_DOMAIN + token.encode("ascii", "replace"),
                        hashlib.sha256).hexdigest()

    def open_link(self, token: str, now: float | None = None, source: str = "") -> LinkView:
        """The review a link is for, after checking everything a decision would (signature,
        expiry, used, still pending, still this person's); changes nothing, so a mail
        scanner that follows the link decides nothing."""
        when = self.clock() if now is None else now
        claims = self._claims(token, when, source)
        record = self.book.get(claims.review_id)
        if record is None:
            raise ReviewLinkRefused("unknown", "no such review")
        if self.book.token_used(record.id, claims.token_id):
            raise ReviewLinkRefused("token_used", "this link was already used")
        if record.state != "pending":
            raise ReviewLinkRefused("decided", f"this message is already {record.state}")
        if when >= record.deadline:
            raise ReviewLinkRefused("expired", "this review timed out")
        # A link for someone who may not take its action shows them nothing of the message.
        if not _may_take(record, claims.person, claims.action):
            self._refused("wrong_person", token_person=claims.person, source=source,
                          review=record.id)
            raise ReviewLinkRefused("wrong_person", "this decision is not yours to take")
        return LinkView(record, claims.person, claims.action, claims.expires)

    def decide_by_link(self, token: str, form_token: str | None, source: str,
                       reason: str = "", now: float | None = None) -> ReviewRecord:
        """The record after the link's person took the link's action (form_token: the
        confirmation form's, see form_token)."""
        when = self.clock() if now is None else now
        if not isinstance(form_token, str) or not hmac.compare_digest(
                form_token.encode("ascii", "replace"), self.form_token(token).encode()):
            self._refused("form", token_person=None, source=source)
            raise ReviewLinkRefused("form", "the form was not this page's; open the link "
                                    "again")
        claims = self._claims(token, when, source)
        person = f"review:{claims.person}"
        try:
            record = self.book.decide(claims.review_id, claims.person, source, claims.action,
                                      _reason(reason), when, token_id=claims.token_id)
        except ReviewRefused as exc:
            self._refused(exc.reason, token_person=claims.person, source=source,
                          review=claims.review_id)
            raise ReviewLinkRefused(exc.reason, str(exc)) from None
        self._record(record, person, source, claims.action, reason)
        return record

    # -- the console (a login) -------------------------------------------------------------
    def pending(self, actor: ActorLike) -> ReviewList:
        """Reviews waiting: the actor's as sender and as approver; admins and auditors also
        see every pending review."""
        check_role(actor)
        sent: dict[str, ReviewRecord] = {}
        to_decide: dict[str, ReviewRecord] = {}
        for address in sorted(actor.addresses):
            mine = self.book.pending_for(address)
            sent.update((r.id, r) for r in mine.as_sender)
            to_decide.update((r.id, r) for r in mine.as_approver)
        everyone = self._all_pending() if actor.role in ("admin", "auditor") else []
        return ReviewList(_ordered(sent.values()), _ordered(to_decide.values()), everyone)

    def review(self, actor: ActorLike, review_id: str) -> ReviewRecord:
        """One review the actor may see (theirs, or any for admin and auditor); NotFound
        otherwise, with the same words as a missing one."""
        check_role(actor)
        record = self.book.get(review_id) if isinstance(review_id, str) else None
        if record is None or not self._may_see(actor, record):
            raise NotFound("no such review")
        return record

    def decide(self, actor: ActorLike, review_id: str, action: str, reason: str = "",
               now: float | None = None) -> ReviewRecord:
        """A console decision: as the actor's own address when it is the sender's (send
        now, confirm, cancel) or a current approver's (approve, reject); an admin decides
        any other on the person's behalf. Forbidden for an auditor and for a user deciding
        what is not theirs to decide; ReviewLinkRefused when the book refuses."""
        when = self.clock() if now is None else now
        record = self.review(actor, review_id)
        if actor.role == "auditor":
            raise Forbidden(f"{actor.name} (auditor) may not decide reviews")
        who = self._as_whom(actor, record, action)
        override = who is None
        if override and actor.role != "admin":
            raise Forbidden(f"{actor.name} may not {action} this message")
        label = actor_label(actor)
        try:
            decided = self.book.decide(record.id, who or label, actor.source, action,
                                       _reason(reason), when, override=override)
        except ReviewRefused as exc:
            self._refused(exc.reason, token_person=label, source=actor.source,
                          review=record.id)
            raise ReviewLinkRefused(exc.reason, str(exc)) from None
        self._record(decided, label, actor.source, action, reason)
        return decided

    # -- inside ----------------------------------------------------------------------------
    def _claims(self, token: str, when: float, source: str = "") -> Claims:
        try:
            return verify(self.key, token, now=when)
        except TokenInvalid as exc:
            self._refused(exc.reason, token_person=None, source=source)
            raise ReviewLinkRefused(exc.reason, str(exc)) from None

    def _may_see(self, actor: ActorLike, record: ReviewRecord) -> bool:
        if actor.role in ("admin", "auditor"):
            return True
        own = {a.lower() for a in actor.addresses}
        return record.sender in own or bool(own & set(record.approvers[:record.step + 1]))

    def _as_whom(self, actor: ActorLike, record: ReviewRecord, action: str) -> str | None:
        """The actor's own address that may take `action` on the record, or None."""
        if action not in KIND_ACTIONS.get(record.kind, ()):
            raise ReviewLinkRefused("wrong_action", f"{str(action)[:40]!r} is not an action "
                                    f"of a {record.kind} review")
        own = {a.lower() for a in actor.addresses}
        if action in SENDER_ACTIONS and record.sender in own:
            return record.sender
        if action in APPROVER_ACTIONS:
            for approver in record.approvers[:record.step + 1]:
                if approver in own:
                    return approver
        return None

    def _all_pending(self) -> list[ReviewRecord]:
        return _ordered(self.book.pending(MAX_LISTED))

    def _record(self, record: ReviewRecord, actor: str, source: str, action: str,
                reason: str) -> None:
        fields = {"review": record.id, "kind": record.kind, "action": action,
                  "state": record.state, "reason": _reason(reason)}
        log_event("review_decided", queue_id=record.queue_id, actor=actor, source=source,
                  **fields)
        if self.audit is not None:
            self.audit.append("review_decided", queue_id=record.queue_id,
                              message_id=record.message_id or None, actor=actor,
                              source=source, **fields)
            self.audit.flush()

    def _refused(self, reason: str, *, token_person: str | None, source: str,
                 review: str | None = None) -> None:
        log_event("review_link_refused", level=logging.WARNING, reason=reason,
                  person=token_person, review=review, source=source or None)


def review_operations_for(config: "GatewayConfig", audit: Any = None) -> ReviewOperations:
    """The review operations of a gateway config: its review book, the key of
    review.token_key_file (read, or made, at the first link), the console's audit log."""
    path = config.review.token_key_file
    return ReviewOperations(open_review_book(config), lambda: load_token_key(path), audit)


def _may_take(record: ReviewRecord, person: str, action: str) -> bool:
    """Whether `person` may take `action` now (the book checks it again when deciding)."""
    if action not in KIND_ACTIONS.get(record.kind, ()):
        return False
    if action in SENDER_ACTIONS:
        return person == record.sender
    return person in record.approvers[:record.step + 1]


def _reason(reason: object) -> str:
    return str(reason or "")[:MAX_REASON]


def _ordered(records: Iterable[ReviewRecord]) -> list[ReviewRecord]:
    return sorted(records, key=lambda r: (r.deadline, r.id))


__all__ = ["LinkView", "ReviewLinkRefused", "ReviewList", "ReviewOperations",
           "review_operations_for"]
