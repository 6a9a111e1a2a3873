"""A message released from a review hold leaves without X-Mailmoat-Review: the review's ID
must not leave the gateway. Every copy of the header goes (a folded one, odd case, several),
and nothing else of the message changes."""
from __future__ import annotations

from pathlib import Path

from milters.core.review import review_reason

from mta.queue.spool import RESUME_AFTER, Envelope, RecipientState
from mta.review.resume import RESUMED_FROM
from tests.unit.test_review_runner import T0, Setup

HEAD = (b"From: a@example.jp\r\nX-Mailmoat-Review: delay 0123\r\nTo: x@partner.example\r\n"
        b"x-mailmoat-review: approve\r\n 4567 folded\r\nSubject: s\r\n"
        b"X-Mailmoat-Reviewed: kept (another header)\r\n"
        b"X-MAILMOAT-REVIEW: delay 89ab\r\n")
BODY = b"\r\nbody mentions X-Mailmoat-Review: delay 0123\r\n"


def test_a_released_message_carries_no_review_header(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.queue.remove(s.queue_id)
    s.queue.enqueue(HEAD + BODY, Envelope(
        "0" * 20, "a@example.jp", [RecipientState("x@partner.example")], received_at=T0,
        hold_reason=review_reason(s.record), extra={RESUME_AFTER: "review"}))
    s.book.decide(s.record.id, "a@example.jp", "192.0.2.1", "send_now", now=T0 + 1)
    s.now = T0 + 1
    s.rounds(3)
    [copy] = s.entries()
    assert copy.hold_reason is None and copy.extra[RESUMED_FROM] == s.queue_id
    sent = s.queue.message(copy.queue_id)
    assert sent == (b"From: a@example.jp\r\nTo: x@partner.example\r\nSubject: s\r\n"
                    b"X-Mailmoat-Reviewed: kept (another header)\r\n" + BODY)
    assert s.book.get(s.record.id).carried_out


def test_a_message_without_the_header_is_released_unchanged(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    raw = s.queue.message(s.queue_id)
    s.book.decide(s.record.id, "a@example.jp", "192.0.2.1", "send_now", now=T0 + 1)
    s.now = T0 + 1
    s.rounds(3)
    [copy] = s.entries()
    assert s.queue.message(copy.queue_id) == raw
