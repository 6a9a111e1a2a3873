"""One outbound review: what is held, who may decide, until when, and what was decided.

A record is a frozen value; a decision makes a new record (`decided`, `escalated` below), so
every backend of the book does the same thing in its own transaction: read the record, apply
one of these pure functions, write the result. The rules live here once, not per backend.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

from ..errors import ReviewError, ReviewRefused

KINDS = ("delay", "confirm", "approve")
STATES = ("pending", "sent", "cancelled", "approved", "rejected", "expired")
ON_TIMEOUT = ("send", "cancel", "escalate")
# What a link or the console may ask for; "timeout" is the timer's own action.
ACTIONS = ("send_now", "cancel", "confirm", "approve", "reject")
TIMER = "timer"  # who and source of the timer's decisions
# The actions each kind of review takes from people (the sender may always withdraw).
KIND_ACTIONS = {
    "delay": frozenset({"send_now", "cancel"}),
    "confirm": frozenset({"confirm", "cancel"}),
    "approve": frozenset({"approve", "reject", "cancel"}),
}
SENDER_ACTIONS = frozenset({"send_now", "cancel", "confirm"})
APPROVER_ACTIONS = frozenset({"approve", "reject"})
_RESULT = {"send_now": "sent", "confirm": "sent", "cancel": "cancelled",
           "approve": "approved", "reject": "rejected"}
# The timer's outcome per on_timeout; escalate with no approver left ends as expired.
_TIMEOUT_RESULT = {"send": "sent", "cancel": "expired", "escalate": "expired"}

ID_PATTERN = re.compile(r"[0-9a-f]{32}\Z")
# Bounds on what a message can put into a record (a 1 MB Subject, 10,000 recipients).
MAX_TEXT = 998
MAX_ITEMS = 1000
MAX_REASON = 2000


@dataclass(frozen=True)
class Decision:
    time: float
    who: str  # an address, "console:NAME", or "timer"
    source: str  # the client's IP address, "cli", or "timer"
    action: str  # one of ACTIONS, "timeout" or "escalate"
    reason: str = ""  # the approver's words to the sender (a rejection's why)


@dataclass(frozen=True)
class ReviewRecord:
    id: str  # 128 random bits in hex: not guessable, so safe in a URL
    queue_id: str
    kind: str  # delay | confirm | approve
    sender: str
    recipients: tuple[str, ...]
    subject: str  # decoded
    attachments: tuple[str, ...]  # file names, decoded
    size: int
    created: float
    deadline: float  # unix time: the delay's end, or the confirmation/approval timeout
    on_timeout: str  # send | cancel | escalate
    approvers: tuple[str, ...] = ()  # in escalation order
    step: int = 0  # the current approver: approvers[step]
    self_approval: bool = False
    state: str = "pending"
    decisions: tuple[Decision, ...] = ()
    # The recipients outside the company (a confirm notice lists these); () = all of them.
    outside: tuple[str, ...] = ()
    step_timeout: float = 0.0  # seconds each escalation step gets; 0: no escalation
    language: str = "ja"  # of the notices, so the result notice matches the first one
    message_id: str = ""  # the held message's Message-ID: notices thread under it
    # When the gateway carried the decision out (released, or deleted and told the sender);
    # 0: not yet. Set once (carried_out below): nothing is released or notified twice.
    carried_out: float = 0.0

    @property
    def approver(self) -> str | None:
        """The approver whose turn it is, or None (no approvers)."""
        return self.approvers[self.step] if self.step < len(self.approvers) else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"),
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ReviewRecord":
        data: dict[str, Any] = json.loads(text)
        for name in ("recipients", "attachments", "approvers", "outside"):
            data[name] = tuple(data.get(name, ()))
        data["decisions"] = tuple(Decision(**d) for d in data.get("decisions", ()))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def new_review(*, queue_id: str, kind: str, sender: str, recipients: Iterable[str],
               subject: str, attachments: Iterable[str] = (), size: int = 0, now: float,
               timeout: float, on_timeout: str | None = None, approvers: Iterable[str] = (),
               self_approval: bool = False, outside: Iterable[str] = (),
               language: str = "ja", message_id: str = "") -> ReviewRecord:
    """A new pending record with a fresh random ID, its deadline `timeout` seconds from now
    (the delay, or the time to confirm or approve), its values bounded and checked."""
    if on_timeout is None:  # a delay sends when it ends; an unanswered question cancels
        on_timeout = "send" if kind == "delay" else "cancel"
    record = ReviewRecord(
        id=secrets.token_hex(16), queue_id=_text(queue_id), kind=kind,
        sender=_address(sender), recipients=_addresses(recipients), subject=_text(subject),
        attachments=tuple(_text(name) for name in list(attachments)[:MAX_ITEMS]),
        size=max(int(size), 0), created=float(now), deadline=float(now) + float(timeout),
        on_timeout=on_timeout, approvers=_addresses(approvers), self_approval=self_approval,
        outside=_addresses(outside), step_timeout=float(timeout) if kind == "approve" else 0.0,
        language=_text(language), message_id=_text(message_id))
    check(record)
    return record


def check(record: ReviewRecord) -> None:
    """ReviewError naming what is wrong with a record the book is asked to keep."""
    problems = []
    if not ID_PATTERN.match(record.id):
        problems.append(f"id is not 32 lower-case hex digits (got {record.id[:40]!r})")
    if record.kind not in KINDS:
        problems.append(f"kind is one of {', '.join(KINDS)} (got {record.kind!r})")
    if record.on_timeout not in ON_TIMEOUT:
        problems.append(f"on_timeout is one of {', '.join(ON_TIMEOUT)} "
                        f"(got {record.on_timeout!r})")
    if record.kind == "approve" and not record.approvers:
        problems.append("an approval needs at least one approver")
    if record.kind != "approve" and record.on_timeout == "escalate":
        problems.append("only an approval can escalate")
    if record.state not in STATES:
        problems.append(f"state is one of {', '.join(STATES)} (got {record.state!r})")
    if not record.sender:
        problems.append("the sender is empty (a bounce is never held for review)")
    if not record.deadline >= record.created:
        problems.append("the deadline is before the record was made")
    if problems:
        raise ReviewError("review record: " + "; ".join(problems))


def _text(value: str) -> str:
    """One line of at most MAX_TEXT characters: no control character survives into a
    record (a notice header or a console page is built from it)."""
    cleaned = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+", " ", str(value)).strip()
    return cleaned[:MAX_TEXT]


def _address(value: str) -> str:
    return _text(value).strip("<>").lower()


def _addresses(values: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for value in values:
        address = _address(value)
        if address:
            seen.setdefault(address, None)
        if len(seen) >= MAX_ITEMS:
            break
    return tuple(seen)


# ---------------------------------------------------------------- the rules of deciding

def decided(record: ReviewRecord, who: str, source: str, action: str, reason: str,
            now: float, *, override: bool = False) -> ReviewRecord:
    """The record after `who` took `action`, or ReviewRefused. `override`: the console
    vouches that an admin decides on someone's behalf (the person check is skipped; the
    self-approval rule is not)."""
    person = _address(who)
    if record.state != "pending":
        raise ReviewRefused("decided", f"review {record.id} is already {record.state}")
    if action == "timeout":
        if person != TIMER:
            raise ReviewRefused("wrong_action", "only the timer decides a timeout")
        if now < record.deadline:
            raise ReviewRefused("not_due", f"review {record.id} is not due yet")
        if record.on_timeout == "escalate" and record.step + 1 < len(record.approvers):
            raise ReviewRefused("wrong_action", f"review {record.id} escalates to the next "
                                "approver (escalate, not timeout)")
        return _with(record, _TIMEOUT_RESULT[record.on_timeout], now, TIMER, TIMER,
                     "timeout", "")
    if action not in KIND_ACTIONS.get(record.kind, ()):
        raise ReviewRefused("wrong_action", f"{action!r} is not an action of a "
                            f"{record.kind} review")
    if now >= record.deadline:
        raise ReviewRefused("expired", f"review {record.id} timed out; it is no longer "
                            "waiting for a decision")
    if action in SENDER_ACTIONS:
        if not override and person != record.sender:
            raise ReviewRefused("wrong_person", f"only the sender may {action} this message")
    else:
        # Any approver up to the current step: escalation adds a decider, removes none.
        allowed = record.approvers[:record.step + 1]
        if not override and person not in allowed:
            raise ReviewRefused("wrong_person", "you are not an approver of this message")
        if person == record.sender and not record.self_approval:
            raise ReviewRefused("self_approval", "the sender may not approve their own "
                                "message")
    return _with(record, _RESULT[action], now, person or who, source, action, reason)


def carried(record: ReviewRecord, now: float) -> ReviewRecord:
    """The decided record marked carried out, or ReviewRefused (pending, or done already)."""
    if record.state == "pending":
        raise ReviewRefused("pending", f"review {record.id} is not decided yet")
    if record.carried_out:
        raise ReviewRefused("carried_out", f"review {record.id} was carried out already")
    return replace(record, carried_out=float(now))


def escalated(record: ReviewRecord, now: float) -> ReviewRecord:
    """The record handed to the next approver with a new deadline, or ReviewRefused."""
    if record.state != "pending":
        raise ReviewRefused("decided", f"review {record.id} is already {record.state}")
    if record.kind != "approve" or record.on_timeout != "escalate":
        raise ReviewRefused("wrong_action", f"review {record.id} does not escalate")
    if record.step + 1 >= len(record.approvers):
        raise ReviewRefused("no_next_approver", f"review {record.id} has no approver left")
    if now < record.deadline:
        raise ReviewRefused("not_due", f"review {record.id} is not due yet")
    step = record.step + 1
    decision = Decision(now, TIMER, TIMER, "escalate", record.approvers[step])
    return replace(record, step=step, deadline=now + (record.step_timeout or 0.0),
                   decisions=record.decisions + (decision,))


def _with(record: ReviewRecord, state: str, now: float, who: str, source: str, action: str,
          reason: str) -> ReviewRecord:
    decision = Decision(float(now), _text(who), _text(source), action,
                        str(reason).replace("\r\n", "\n")[:MAX_REASON])
    return replace(record, state=state, decisions=record.decisions + (decision,))


def involves(record: ReviewRecord, address: str) -> tuple[bool, bool]:
    """(is the sender, may decide as an approver now) for one address."""
    person = _address(address)
    return person == record.sender, person in record.approvers[:record.step + 1]


__all__ = ["ACTIONS", "Decision", "KINDS", "ON_TIMEOUT", "ReviewRecord", "STATES", "TIMER",
           "check", "decided", "escalated", "involves", "new_review"]
