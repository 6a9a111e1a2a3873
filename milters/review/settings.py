"""The `review:` section of a policy, its rule action and its test expectations.

A rule holds outbound mail for review with `then: {review: ...}`:

    {review: {delay: 5m}}                          held 5 minutes, then sent; the sender may
                                                   send it now or cancel it
    {review: {confirm: true, timeout: 24h}}        the sender confirms the outside recipients;
                                                   no answer in time cancels it
    {review: {approve: {approvers: [boss@example.jp, role:admin], self_approval: false,
                        timeout: 8h, on_timeout: send|cancel|escalate,
                        escalate_to: [cio@example.jp]}}}
    review: none                                   not held

Which messages are held is said by the rule's `when:` (outside_recipients, outside_domains,
attachments, size, subject ...); this section says how the notices are written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from milters.core.policy.schema import (Bool, Duration, Either, Field, ListOf, Scalar, Str,
                                        Struct)

MILTER = "review"
KINDS = ("delay", "confirm", "approve")
ACTIONS = KINDS + ("none",)
ON_TIMEOUT = ("send", "cancel", "escalate")
LANGUAGES = ("ja", "en")
ROLES = ("admin", "auditor", "user")  # the console's roles (mta/console/identity.py)
MAX_WAIT = 30 * 86400.0  # a hold longer than a month is a mistake, not a review
# A plain addr-spec, as the console's accounts file holds them.
_ADDRESS = re.compile(r"[^\s@:,\"<>()\[\]\\]{1,64}@[A-Za-z0-9.-]{1,253}")


@dataclass(frozen=True)
class Approver:
    """One entry of `approvers:` / `escalate_to:`: an address, every console account of
    a role (`role:admin`), or the sender's manager in the directory (`manager`)."""

    kind: str  # address | role | manager
    value: str  # the address (lower-cased), the role, or "manager"

    def __str__(self) -> str:
        return f"role:{self.value}" if self.kind == "role" else self.value


@dataclass(frozen=True)
class Review:
    """A rule's review action (never for `review: none`, which stays the word)."""

    kind: str  # delay | confirm | approve
    wait: float  # seconds: the delay, or the time to confirm or approve
    on_timeout: str  # send (delay) | cancel (confirm) | the approval's choice
    approvers: tuple[Approver, ...] = ()
    escalate_to: tuple[Approver, ...] = ()
    self_approval: bool = False

    def __str__(self) -> str:
        hours = _human(self.wait)
        if self.kind == "delay":
            return f"delay {hours}, then send"
        if self.kind == "confirm":
            return f"confirm by the sender within {hours}, else cancel"
        text = (f"approve by {', '.join(map(str, self.approvers))} within {hours}, else "
                f"{self.on_timeout}")
        if self.escalate_to:
            text += " to " + ", ".join(map(str, self.escalate_to))
        return text + ("" if not self.self_approval else "; the sender may approve")


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class ApproverSpec(Scalar):
    expected = ("an approver: an address (boss@example.jp), role:ROLE (role:admin) or "
                "manager")

    def parse(self, text: str) -> Approver:
        text = text.strip()
        if text == "manager":
            return Approver("manager", "manager")
        if text.startswith("role:"):
            role = text[5:]
            if role not in ROLES:
                raise ValueError(f"role:{role} is not a console role; use one of "
                                 + ", ".join(f"role:{r}" for r in ROLES))
            return Approver("role", role)
        if not _ADDRESS.fullmatch(text) or any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ValueError("expected a plain address (boss@example.jp), role:ROLE or manager; "
                             "patterns like @example.jp cannot approve")
        return Approver("address", text.lower())


def _approve(approvers: list[Approver], self_approval: bool, timeout: float, on_timeout: str,
             escalate_to: list[Approver]) -> Review:
    if on_timeout == "escalate" and not escalate_to:
        raise ValueError("on_timeout: escalate needs escalate_to (who decides next)")
    if escalate_to and on_timeout != "escalate":
        raise ValueError(f"escalate_to is only used with on_timeout: escalate (got "
                         f"on_timeout: {on_timeout}); delete it or escalate")
    return Review("approve", timeout, on_timeout, tuple(approvers), tuple(escalate_to),
                  self_approval)


APPROVE_SPEC = Struct({
    "approvers": Field(ListOf(ApproverSpec(), min_items=1),
                       doc="Who approves: addresses and role:ROLE (console accounts of that "
                           "role), in order."),
    "self_approval": Field(Bool(), False,
                           doc="Whether a sender who is also an approver may approve their own "
                               "message."),
    "timeout": Field(Duration(minimum=60), 86400.0,
                     doc="Time the approvers have to decide."),
    "on_timeout": Field(Str(ON_TIMEOUT), "cancel",
                        doc="Nobody decided in time: send, cancel, or escalate (to "
                            "escalate_to, each with the same timeout)."),
    "escalate_to": Field(ListOf(ApproverSpec()), (),
                         doc="The next approvers, in order, for on_timeout: escalate."),
}, build=_approve, expected="approval settings: approvers, self_approval, timeout, "
                            "on_timeout, escalate_to")


def _review(delay: float | None, confirm: bool | None, timeout: float | None,
            approve: Review | None) -> Review:
    chosen = [name for name, value in (("delay", delay), ("confirm", confirm),
                                        ("approve", approve)) if value is not None]
    if len(chosen) != 1:
        raise ValueError("name exactly one of delay, confirm, approve (got "
                         + (", ".join(chosen) or "none") + "); to hold nothing write review: none")
    if confirm is False:
        raise ValueError("confirm: false holds nothing; write review: none instead")
    if timeout is not None and not confirm:
        raise ValueError("timeout belongs to confirm (approve has its own); a delay is its own "
                         "deadline")
    if delay is not None:
        _bounded(delay, "delay")
        return Review("delay", delay, "send")
    if confirm:
        wait = timeout if timeout is not None else 86400.0
        _bounded(wait, "timeout")
        return Review("confirm", wait, "cancel")
    assert approve is not None
    _bounded(approve.wait, "approve.timeout")
    return approve


def _bounded(seconds: float, name: str) -> None:
    if seconds > MAX_WAIT:
        raise ValueError(f"{name} is longer than 30 days; mail held that long is lost mail")


REVIEW_SPEC = Struct({
    "delay": Field(Duration(minimum=1), None,
                   doc="Hold the message this long, then send it; the sender may send it now "
                       "or cancel it."),
    "confirm": Field(Bool(), None,
                     doc="true: the sender must confirm the outside recipients before it "
                         "leaves."),
    "timeout": Field(Duration(minimum=60), None,
                     doc="For confirm: time to confirm (default 24h); then the message is "
                         "cancelled."),
    "approve": Field(APPROVE_SPEC, None, doc="Hold until an approver decides."),
}, build=_review, expected="a review: {delay: 5m}, {confirm: true} or {approve: {...}}")

class NoReview(Scalar):
    expected = "none"

    def parse(self, text: str) -> str:
        if text != "none":
            raise ValueError("expected none, or a mapping: {delay: 5m}, {confirm: true} or "
                             "{approve: {approvers: [...]}}")
        return text


ACTION_SPEC = Either(NoReview(), REVIEW_SPEC)


@dataclass(frozen=True)
class ReviewSettings:
    language: str = "ja"  # of the notices
    reinject_timeout: float = 30.0


SETTINGS_SPEC = Struct({
    "language": Field(Str(LANGUAGES), "ja",
                      doc="Language of the review notices: ja (ISO-2022-JP) or en (UTF-8)."),
    "reinject_timeout": Field(Duration(minimum=1), 30.0,
                              doc="Time for the MTA to take a review notice."),
}, build=ReviewSettings, expected="the review settings: language, reinject_timeout")


@dataclass(frozen=True)
class ReviewExpectation:
    action: str | None = None  # delay | confirm | approve | none
    rule: str | None = None


EXPECT_SPEC = Struct({
    "action": Field(Str(ACTIONS), None,
                    doc="The expected review: delay, confirm, approve or none."),
    "rule": Field(Str(), None, doc="The rule expected to decide; (defaults) when none does."),
}, build=ReviewExpectation, expected="expectations: action, rule")
