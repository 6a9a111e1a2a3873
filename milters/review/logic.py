"""The review milter's decision at end of message: outbound mail that a review rule matches
is recorded in the review book, held (quarantined with the reason `mailmoat-review KIND ID`),
marked with `X-Mailmoat-Review: KIND ID`, and the notices carrying the signed links go out.

The book, the notice renderers and the link issuer come in as a ReviewKit (milter.py builds
it from milters.core.review), so this file is tested without them. A notice that cannot be
handed to the MTA tempfails the message: the sender's MTA retries, nothing is held unseen.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from milters.core.edits import AddHeader, ChangeHeader, Edit, EomResult, Quarantine
from milters.core.errors import MailmoatError
from milters.core.eventlog import log_event
from milters.core.message import Message
from milters.core.mime.locate import locate_attachments
from milters.core.policy.document import Policy
from milters.core.reinject import reinject
from milters.core.verdict import SmtpReply, Verdict

from .decide import ReviewDecision, needs_groups, review_for
from .settings import MILTER, Approver, Review, ReviewSettings

REVIEW_HEADER = "X-Mailmoat-Review"
TEMPFAIL = SmtpReply(451, "4.3.0", "Temporary problem holding the message for review; "
                                   "try again later")
# The links each person gets, by the kind of review.
SENDER_ACTIONS = {"delay": ("send_now", "cancel"), "confirm": ("confirm", "cancel"),
                  "approve": ("cancel",)}  # the sender may withdraw what waits for approval
APPROVER_ACTIONS = ("approve", "reject")
UNREADABLE = "(attachments unreadable)"  # a message whose MIME fails to scan: fail closed
Sender = Callable[[str, str, list[str], bytes, float], str]


@dataclass(frozen=True)
class ReviewKit:
    """What the logic needs from milters.core.review (and the gateway config)."""

    book: Any  # .create(record) -> record
    new_review: Callable[..., Any]  # keyword arguments -> a fresh pending record
    render_for_sender: Callable[[Any, dict[str, str], str], bytes]
    render_for_approver: Callable[[Any, str, dict[str, str], str], bytes]
    issue_link: Callable[[str, str, str, float], str]  # id, person, action, expires -> URL
    reason_prefix: str  # "mailmoat-review"
    role_addresses: Callable[[str], list[str]]  # a console role -> its accounts' addresses
    # milters.core.directory.Directory (console.ldap): .manager_address(), .sender_groups();
    # None: no directory (`manager` finds nobody, sender_groups rules never match)
    directory: Any = None


def _send(listen: str, mail_from: str, recipients: list[str], raw: bytes,
          timeout: float) -> str:
    return reinject(listen, mail_from, recipients, raw, timeout)


class ReviewChecker:
    def __init__(self, hostname: str, reinject_listen: str, kit: ReviewKit,
                 clock: Callable[[], float] = time.time, send: Sender = _send) -> None:
        self.hostname, self.listen, self.kit = hostname, reinject_listen, kit
        self.clock, self.send = clock, send

    def check(self, message: Message, policy: Policy) -> EomResult:
        env = message.envelope
        edits: list[Edit] = self._forged_headers(message)
        subject = message.decoded_subject
        names = attachment_names(message)
        try:
            groups = self._groups(env.mail_from or "", policy)
        except MailmoatError as exc:  # the directory is down: hold nothing unseen
            log_event("review_failed", level=logging.ERROR, milter=MILTER,
                      queue_id=env.queue_id, rule="(sender_groups)", error=str(exc))
            return EomResult(Verdict.tempfail(TEMPFAIL, reason=str(exc)), edits)
        decision = review_for(policy, env, subject, names, len(message.raw), groups)
        if decision.review is None:
            return EomResult(Verdict.cont(), edits)
        settings: ReviewSettings = policy.sections[MILTER]
        try:
            record = self._record(message, decision, decision.review, settings, names)
            notified = self._notify(record, decision.review, settings)
        except (MailmoatError, OSError, ValueError) as exc:
            log_event("review_failed", level=logging.ERROR, milter=MILTER,
                      queue_id=env.queue_id, rule=decision.why, error=str(exc))
            return EomResult(Verdict.tempfail(TEMPFAIL, reason=str(exc)), edits)
        tag = f"{record.kind} {record.id}"
        log_event("review_held", milter=MILTER, queue_id=env.queue_id, review=record.id,
                  kind=record.kind, rule=decision.why, deadline=int(record.deadline),
                  notice_to=",".join(notified) or None)
        edits += [Quarantine(f"{self.kit.reason_prefix} {tag}"), AddHeader(REVIEW_HEADER, tag)]
        return EomResult(Verdict.cont(f"held for review: {tag}"), edits)

    def _groups(self, sender: str, policy: Policy) -> frozenset[str] | None:
        """The sender's groups when a rule needs them and there is a directory to ask."""
        if self.kit.directory is None or not sender or not needs_groups(policy):
            return None
        return frozenset(self.kit.directory.sender_groups(sender))

    @staticmethod
    def _forged_headers(message: Message) -> list[Edit]:
        """Every X-Mailmoat-Review a client sent: removed, last first (indexes stay right).
        Only ours, added after this, names a review."""
        count = sum(1 for name, _ in message.raw_headers() if name.lower() ==
                    REVIEW_HEADER.lower())
        return [ChangeHeader(REVIEW_HEADER, index, "") for index in range(count, 0, -1)]

    def _record(self, message: Message, decision: ReviewDecision, review: Review,
                settings: ReviewSettings, names: list[str]) -> Any:
        env = message.envelope
        approvers: list[str] = []
        if review.kind == "approve":
            approvers = self._resolve(review.approvers + review.escalate_to,
                                      env.mail_from or "", review.self_approval,
                                      env.queue_id)
            if not approvers:
                raise MailmoatError("no approver: the rule's approvers resolve to no address "
                                    "(an empty role, a manager the directory does not "
                                    "name, or only the sender without self_approval)")
        record = self.kit.new_review(
            queue_id=env.queue_id or "", kind=review.kind, sender=env.mail_from or "",
            recipients=[r.address for r in env.accepted_recipients()],
            subject=message.decoded_subject, attachments=names, size=len(message.raw),
            now=self.clock(), timeout=review.wait, on_timeout=review.on_timeout,
            approvers=approvers, self_approval=review.self_approval, outside=decision.outside,
            language=settings.language, message_id=message.raw_header("Message-ID") or "")
        return self.kit.book.create(record)

    def _resolve(self, entries: tuple[Approver, ...], sender: str, self_approval: bool,
                 queue_id: str | None = None) -> list[str]:
        """Addresses in order, each once; the sender left out unless self_approval. A
        `manager` the directory does not name is skipped: the next approver decides (none
        left: the caller tempfails). A directory that is down raises (451)."""
        found: dict[str, None] = {}
        for entry in entries:
            if entry.kind == "manager":
                manager = (self.kit.directory.manager_address(sender)
                           if self.kit.directory is not None else None)
                if manager is None:
                    log_event("review_no_manager", level=logging.WARNING, milter=MILTER,
                              queue_id=queue_id, sender=sender,
                              directory="console.ldap" if self.kit.directory is not None
                              else "none configured")
                addresses = [manager] if manager else []
            elif entry.kind == "address":
                addresses = [entry.value]
            else:
                addresses = self.kit.role_addresses(entry.value)
            for address in addresses:
                found.setdefault(address.lower(), None)
        if not self_approval:
            found.pop(sender.lower(), None)
        return list(found)

    def _notify(self, record: Any, review: Review, settings: ReviewSettings) -> list[str]:
        """Re-inject the notices (the approver's first: the decision waits on it); who got
        one."""
        def links(person: str, actions: tuple[str, ...]) -> dict[str, str]:
            return {action: self.kit.issue_link(record.id, person, action, record.deadline)
                    for action in actions}

        notices: list[tuple[str, bytes]] = []
        if review.kind == "approve":
            # The approver whose turn it is; escalation (the timer) notifies the next.
            approver = record.approvers[record.step]
            notices.append((approver, self.kit.render_for_approver(
                record, approver, links(approver, APPROVER_ACTIONS), settings.language)))
        notices.append((record.sender, self.kit.render_for_sender(
            record, links(record.sender, SENDER_ACTIONS[review.kind]), settings.language)))
        for person, raw in notices:
            self.send(self.listen, "", [person], raw, settings.reinject_timeout)
        return [person for person, _ in notices]


def attachment_names(message: Message) -> list[str]:
    """The attachments' decoded file names ("" named as such); a message whose MIME cannot
    be scanned counts as one with attachments, so a review rule on them still holds it."""
    try:
        found = locate_attachments(message.mime_raw)
    except Exception:  # noqa: BLE001 -- hostile MIME must not let mail skip its review
        return [UNREADABLE]
    return [a.filename or "(no name)" for a in found.attachments]
