"""A stand-in for milters.core.review in unit tests of the review milter's logic: a book in
a dict, records as plain dataclasses, notices that list their links, links that name what
they were issued for. The real package is used by the serve integration test."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from milters.review.logic import ReviewKit

PREFIX = "mailmoat-review"


@dataclass
class StandinRecord:
    id: str
    queue_id: str
    kind: str
    sender: str
    recipients: tuple[str, ...]
    subject: str
    attachments: tuple[str, ...]
    size: int
    created: float
    deadline: float
    on_timeout: str
    approvers: tuple[str, ...] = ()
    step: int = 0
    self_approval: bool = False
    outside: tuple[str, ...] = ()
    language: str = "ja"
    message_id: str = ""


def new_review(*, queue_id: str, kind: str, sender: str, recipients: Any, subject: str,
               attachments: Any = (), size: int = 0, now: float, timeout: float,
               on_timeout: str | None = None, approvers: Any = (), self_approval: bool = False,
               outside: Any = (), language: str = "ja", message_id: str = "") -> StandinRecord:
    return StandinRecord(secrets.token_hex(16), queue_id, kind, sender, tuple(recipients),
                         subject, tuple(attachments), size, now, now + timeout,
                         on_timeout or "send", tuple(approvers), 0, self_approval,
                         tuple(outside), language, message_id)


@dataclass
class StandinBook:
    records: dict[str, StandinRecord] = field(default_factory=dict)
    fail: Exception | None = None

    def create(self, record: StandinRecord) -> StandinRecord:
        if self.fail is not None:
            raise self.fail
        self.records[record.id] = record
        return record


@dataclass
class Standin:
    book: StandinBook = field(default_factory=StandinBook)
    roles: dict[str, list[str]] = field(default_factory=dict)
    links: list[tuple[str, str, str, float]] = field(default_factory=list)

    def kit(self) -> ReviewKit:
        return ReviewKit(book=self.book, new_review=new_review,
                         render_for_sender=self.render_for_sender,
                         render_for_approver=self.render_for_approver,
                         issue_link=self.issue_link, reason_prefix=PREFIX,
                         role_addresses=lambda role: list(self.roles.get(role, [])))

    def issue_link(self, review_id: str, person: str, action: str, expires: float) -> str:
        self.links.append((review_id, person, action, expires))
        return f"https://console.test/review/{action}.{person}.{review_id}"

    @staticmethod
    def render_for_sender(record: StandinRecord, links: dict[str, str], language: str) -> bytes:
        return _notice(record.sender, f"sender {record.kind} {language}", links)

    @staticmethod
    def render_for_approver(record: StandinRecord, approver: str, links: dict[str, str],
                            language: str) -> bytes:
        return _notice(approver, f"approver {record.kind} {language}", links)


def _notice(to: str, what: str, links: dict[str, str]) -> bytes:
    lines = [f"To: {to}", f"Subject: {what}", ""] + [f"{a} {u}" for a, u in links.items()]
    return "\r\n".join(lines).encode() + b"\r\n"
