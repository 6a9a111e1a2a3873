"""Deleting a message held for review (`mailmoat queue delete`, the console) cancels its
review in the book: no pending review is left without its message, nothing for the timer or
serve's runner to act on later. A copy split off for some recipients shares the hold reason
but not the review; a book that cannot be reached keeps the message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from milters.core.config import load_config
from milters.core.errors import StoreUnavailable
from milters.core.review import MemoryReviewBook, new_review, open_review_book, review_reason
from mta.console.identity import Actor
from mta.operations import OperationError, Operations
from mta.queue.spool import RESUME_AFTER, Envelope, Queue, RecipientState, new_queue_id
from mta.queue.split import split_release
from tests.harness.milter_proc import ROOT
from tests.harness.recording_audit import RecordingAudit

T0 = 1_795_900_000.0
ADMIN = Actor("alice", "admin", frozenset(), "192.0.2.1")
RAW = b"From: taro@example.jp\r\nSubject: s\r\nX-Mailmoat-Review: x\r\n\r\nbody\r\n"


def held(queue: Queue, book, kind: str = "approve") -> tuple[str, str]:  # type: ignore[no-untyped-def]
    queue_id = new_queue_id()
    extra = {"approvers": ["boss@example.jp"]} if kind == "approve" else {}
    record = book.create(new_review(queue_id=queue_id, kind=kind, sender="taro@example.jp",
                                    recipients=["x@partner.example", "y@partner.example"],
                                    subject="s", now=T0, timeout=3600, **extra))
    queue.enqueue(RAW, Envelope(queue_id, "taro@example.jp",
                                [RecipientState("x@partner.example"),
                                 RecipientState("y@partner.example")], T0,
                                hold_reason=review_reason(record),
                                extra={RESUME_AFTER: "review"}))
    return queue_id, record.id


def test_a_deleted_review_hold_cancels_its_review(tmp_path: Path) -> None:
    queue, book, audit = Queue(tmp_path / "spool"), MemoryReviewBook(), RecordingAudit()
    ops = Operations(queue, audit, review_book=lambda: book)
    queue_id, review_id = held(queue, book)
    other_id, other_review = held(queue, book, "delay")
    assert ops.delete(ADMIN, queue_id).ok
    record = book.get(review_id)
    assert record.state == "cancelled" and record.carried_out
    assert record.decisions[-1].who == "console:alice"
    assert record.decisions[-1].source == "192.0.2.1"
    assert [r.id for r in book.pending()] == [other_review] and book.undone() == []
    assert book.due(T0 + 10 ** 6) == [book.get(other_review)]  # only the other one's timer
    assert [e.queue_id for e in queue.entries()] == [other_id]
    [removed] = [r for r in audit.records if r.event == "removed"]
    assert removed.fields["review"] == review_id


def test_a_split_copy_deleted_leaves_the_review_with_the_original(tmp_path: Path) -> None:
    queue, book = Queue(tmp_path / "spool"), MemoryReviewBook()
    ops = Operations(queue, None, review_book=lambda: book)
    queue_id, review_id = held(queue, book)
    copy_id = split_release(queue, queue_id, ["y@partner.example"])
    assert copy_id and queue.envelope(copy_id).hold_reason == queue.envelope(queue_id).hold_reason
    ops.delete(ADMIN, copy_id)
    assert book.get(review_id).state == "pending" and not book.get(review_id).carried_out
    ops.delete(ADMIN, queue_id)
    assert book.get(review_id).state == "cancelled" and queue.entries() == []


def test_other_holds_never_open_the_book_and_a_dead_book_keeps_the_message(
        tmp_path: Path) -> None:
    queue, book = Queue(tmp_path / "spool"), MemoryReviewBook()
    opened = []

    def dead() -> MemoryReviewBook:
        opened.append(1)
        raise StoreUnavailable("review book on Redis 127.0.0.1:1: connection refused")

    ops = Operations(queue, None, review_book=dead)
    plain = queue.enqueue(RAW, Envelope(new_queue_id(), "a@example.jp",
                                        [RecipientState("b@example.jp")], T0,
                                        hold_reason="mailmoat-review delay " + "0" * 31))
    ops.delete(ADMIN, plain)
    assert opened == []  # not a review reason (31 hex digits): no book needed
    queue_id, review_id = held(queue, book)
    with pytest.raises(OperationError, match="held for review"):
        ops.delete(ADMIN, queue_id)
    assert [e.queue_id for e in queue.entries()] == [queue_id]
    assert book.get(review_id).state == "pending"


def test_queue_delete_on_the_command_line_cancels_the_review(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("gateway:\n  queue: {dir: spool}\nstore: sqlite:///state.db\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the store's relative path, as the command reads it
    try:
        book = open_review_book(load_config(str(config)))
    finally:
        os.chdir(cwd)
    queue = Queue(tmp_path / "spool")
    queue_id, review_id = held(queue, book, "delay")
    done = subprocess.run([sys.executable, "-m", "mta.cli", "queue", "delete", queue_id,
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout == f"{queue_id}: deleted\n", done.stderr
    record = book.get(review_id)
    assert record.state == "cancelled" and record.carried_out and book.pending() == []
    assert record.decisions[-1].source == "cli"
    book.close()
