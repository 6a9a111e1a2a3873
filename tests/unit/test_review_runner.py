"""serve's review runner without sockets: a real queue and a memory review book, an empty rest
of the chain. Timers fire once and not early, a decision is carried out once over many rounds,
a crash between the steps leaves nothing held twice or delivered twice."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from milters.core.review import MemoryReviewBook, new_review, review_reason
from milters.core.review.record import ReviewRecord

from mta.queue.spool import RESUME_AFTER, RESUME_REQUESTED, Envelope, Queue, RecipientState
from mta.review.resume import RESUMED_FROM
from mta.review.runner import ReviewRunner

T0 = 1_700_000_000.0
RAW = b"From: a@example.jp\r\nTo: x@partner.example\r\nSubject: s\r\n\r\nbody\r\n"


class Notices:
    def render_result(self, record: ReviewRecord) -> bytes:
        return f"result {record.state}".encode()

    def render_for_approver(self, record: ReviewRecord, approver: str, links: Any,
                            lang: str) -> bytes:
        return f"approve {approver}".encode()


class Setup:
    def __init__(self, tmp_path: Path, kind: str = "delay", **over: Any) -> None:
        self.queue, self.book = Queue(tmp_path / "spool"), MemoryReviewBook()
        self.now, self.sent = T0, []
        self.record = self.book.create(new_review(
            queue_id="0" * 20, kind=kind, sender="a@example.jp",
            recipients=["x@partner.example"], subject="s", now=T0, timeout=60, **over))
        self.queue_id = self.queue.enqueue(RAW, Envelope(
            "0" * 20, "a@example.jp", [RecipientState("x@partner.example")], received_at=T0,
            hold_reason=review_reason(self.record), extra={RESUME_AFTER: "review"}))
        self.runner = ReviewRunner(
            queue=self.queue, book=self.book, members=[], chain_for=lambda rest: None,  # type: ignore[arg-type, return-value]
            hostname="mx", reinject_listen="127.0.0.1:1", notices=Notices(),
            issue_link=lambda *a: "http://c/review/t",
            send=lambda listen, frm, to, raw, t: self.sent.append((to, raw)) or "250",
            clock=lambda: self.now)

    def rounds(self, count: int = 3) -> None:
        for _ in range(count):
            asyncio.run(self.runner.round())

    def entries(self) -> list[Envelope]:
        return self.queue.entries()


def test_a_delay_is_not_sent_early_and_is_sent_once(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.now = T0 + 59
    s.rounds()
    assert [e.queue_id for e in s.entries()] == [s.queue_id]  # still held
    s.now = T0 + 60
    s.rounds(5)
    [copy] = s.entries()
    assert copy.hold_reason is None and copy.extra[RESUMED_FROM] == s.queue_id
    assert RESUME_AFTER not in copy.extra and s.queue.message(copy.queue_id) == RAW
    assert s.book.get(s.record.id).carried_out and s.sent == []


def test_a_cancel_is_told_once_and_the_message_deleted(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.book.decide(s.record.id, "a@example.jp", "192.0.2.1", "cancel", now=T0 + 1)
    s.rounds(5)
    assert s.entries() == [] and s.sent == [(["a@example.jp"], b"result cancelled")]


def test_an_approval_escalates_with_a_notice_then_expires(tmp_path: Path) -> None:
    s = Setup(tmp_path, kind="approve", approvers=["b@example.jp", "c@example.jp"],
              on_timeout="escalate")
    s.now = T0 + 60
    s.rounds(3)
    assert s.sent == [(["c@example.jp"], b"approve c@example.jp")]
    assert s.book.get(s.record.id).approver == "c@example.jp"
    s.now = T0 + 120
    s.rounds(3)
    assert s.entries() == [] and s.sent[1:] == [(["a@example.jp"], b"result expired")]


def test_an_admin_release_is_decided_on_their_behalf_and_carried_out(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.queue.release(s.queue_id)
    [held] = s.entries()
    assert held.hold_reason and held.extra[RESUME_REQUESTED]  # not delivered directly
    s.now = T0 + 5
    s.rounds(3)
    [copy] = s.entries()
    assert copy.hold_reason is None
    record = s.book.get(s.record.id)
    assert record.state == "sent" and record.decisions[-1].source == "queue"


def test_after_a_crash_between_the_steps_nothing_is_held_or_sent_twice(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.book.decide(s.record.id, "a@example.jp", "192.0.2.1", "send_now", now=T0 + 1)
    # A crash after the new entry was durable, before the book or the old entry changed.
    copy = s.queue.enqueue(RAW, Envelope("1" * 20, "a@example.jp",
                                         [RecipientState("x@partner.example")],
                                         received_at=T0, extra={RESUMED_FROM: s.queue_id}))
    s.rounds(3)
    assert [e.queue_id for e in s.entries()] == [copy]
    assert s.book.get(s.record.id).carried_out


def test_after_a_crash_past_the_mark_the_held_leftover_goes(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.book.decide(s.record.id, "a@example.jp", "192.0.2.1", "cancel", now=T0 + 1)
    s.book.carry_out(s.record.id, now=T0 + 2)  # marked; the crash came before the delete
    s.rounds(2)
    assert s.entries() == [] and s.sent == []
