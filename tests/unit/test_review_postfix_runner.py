"""The review runner behind Postfix without a Postfix: a memory review book and a stand-in for
Postfix's queue commands (what postqueue -j lists, what postsuper -H / -d / postqueue -i did),
so each case sets the queue as an admin or a crash would leave it. The real Postfix runs in
tests/integration/test_review_postfix.py.

A decision is carried out once over many rounds; a failing postsuper is tried again; what an
admin does by hand (postsuper -H, -d) is seen and recorded; a message in its SMTP session or on
another gateway (a shared book) is never touched."""
from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest

from milters.core.review import MemoryReviewBook, new_review
from milters.core.review.record import ReviewRecord

from mta.review.postfix_queue import PostfixCommandFailed, PostfixQueue
from mta.review.postfix_runner import PostfixReviewRunner
from tests.unit.test_review_runner import Notices

T0 = 1_700_000_000.0
QID = "8BFD7236036"
SENDER = "hanako@example.jp"


class QueueStandIn:
    """Where each message is, and the commands the runner ran."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {}
        self.done: list[tuple[str, str]] = []
        self.failing = 0  # the next N release/delete calls fail
        self.stuck: set[str] = set()  # IDs release_many leaves on hold

    def listing(self) -> dict[str, str]:
        return dict(self.where)

    def _maybe_fail(self, what: str) -> None:
        if self.failing:
            self.failing -= 1
            raise PostfixCommandFailed(f"{what}: postsuper exited 1")

    def release(self, queue_id: str) -> None:
        self._maybe_fail("release")
        assert self.where[queue_id] == "hold"
        self.done.append(("release", queue_id))
        self.where.pop(queue_id)  # to the release port, delivered

    def delete(self, queue_id: str) -> None:
        self._maybe_fail("delete")
        assert self.where[queue_id] == "hold"
        self.done.append(("delete", queue_id))
        self.where.pop(queue_id)

    def release_many(self, queue_ids: list[str]) -> set[str]:
        self._maybe_fail("release_many")
        released = {q for q in queue_ids if self.where.get(q) == "hold"} - self.stuck
        self.done.append(("release_many", ",".join(sorted(released))))
        for queue_id in released:
            self.where[queue_id] = "deferred"
        return released

    def deliver_now(self, queue_id: str) -> None:
        self.done.append(("deliver_now", queue_id))
        self.where.pop(queue_id, None)


class Setup:
    def __init__(self, kind: str = "approve", **over: Any) -> None:
        self.book, self.queue = MemoryReviewBook(), QueueStandIn()
        self.now, self.sent = T0, []
        if kind == "approve":
            over.setdefault("approvers", ["boss@example.jp"])
        self.record = self.book.create(new_review(
            queue_id=QID, kind=kind, sender=SENDER, recipients=["x@partner.example"],
            subject="s", now=T0, timeout=60, **over))
        self.queue.where[QID] = "hold"
        self.runner = PostfixReviewRunner(
            postfix=self.queue, book=self.book, reinject_listen="127.0.0.1:1",  # type: ignore[arg-type]
            notices=Notices(), issue_link=lambda *a: "http://c/review/t",
            send=lambda listen, frm, to, raw, t: self.sent.append((to, raw)) or "250",
            clock=lambda: self.now)

    def rounds(self, count: int = 3) -> None:
        for _ in range(count):
            asyncio.run(self.runner.round())

    def state(self) -> ReviewRecord:
        record = self.book.get(self.record.id)
        assert record is not None
        return record


def test_a_pending_hold_is_left_alone() -> None:
    s = Setup()
    s.rounds(5)
    assert s.queue.done == [] and s.sent == [] and s.state().state == "pending"


def test_an_approval_releases_once_over_many_rounds() -> None:
    s = Setup()
    s.rounds(1)
    s.book.decide(s.record.id, "boss@example.jp", "192.0.2.1", "approve", now=T0 + 1)
    s.rounds(5)
    assert s.queue.done == [("release", QID)] and s.sent == []
    assert s.state().carried_out


def test_a_cancel_deletes_from_hold_and_tells_the_sender_once() -> None:
    s = Setup(kind="delay")
    s.book.decide(s.record.id, SENDER, "192.0.2.1", "cancel", now=T0 + 1)
    s.rounds(5)
    assert s.queue.done == [("delete", QID)]
    assert s.sent == [([SENDER], b"result cancelled")] and s.state().carried_out


def test_a_delay_is_released_when_it_ends_not_before() -> None:
    s = Setup(kind="delay")
    s.now = T0 + 59
    s.rounds()
    assert s.queue.done == []
    s.now = T0 + 60
    s.rounds(4)
    assert s.queue.done == [("release", QID)] and s.state().state == "sent"


def test_a_failing_postsuper_is_tried_again_and_done_once() -> None:
    s = Setup()
    s.book.decide(s.record.id, "boss@example.jp", "192.0.2.1", "approve", now=T0 + 1)
    s.queue.failing = 2
    s.rounds(2)
    assert s.queue.done == [] and not s.state().carried_out  # still held, still owed
    s.rounds(4)
    assert s.queue.done == [("release", QID)] and s.state().carried_out


def test_postsuper_H_by_hand_decides_the_review_for_the_admin_and_delivers_now() -> None:
    s = Setup()
    s.rounds(1)  # seen on hold
    s.queue.where[QID] = "deferred"  # postsuper -H: waiting for the next queue scan
    s.rounds(3)
    record = s.state()
    assert record.state == "approved" and record.carried_out
    assert record.decisions[-1].who == "postsuper" and record.decisions[-1].source == "postfix"
    assert s.queue.done == [("deliver_now", QID)] and s.sent == []


def test_postsuper_d_by_hand_withdraws_the_review_and_sends_nothing() -> None:
    s = Setup()
    s.rounds(1)
    del s.queue.where[QID]
    s.rounds(3)
    record = s.state()
    assert record.state == "cancelled" and record.carried_out
    assert s.queue.done == [] and s.sent == []


def test_a_message_still_being_received_is_not_taken_for_a_release() -> None:
    s = Setup()
    s.queue.where[QID] = "incoming"
    s.rounds(3)
    assert s.state().state == "pending" and s.queue.done == []


def test_another_gateways_review_is_never_touched() -> None:
    """A shared book: a review whose message this Postfix never had."""
    s = Setup()
    del s.queue.where[QID]
    s.rounds(3)
    assert s.state().state == "pending"  # not withdrawn: it was never seen here
    s.book.decide(s.record.id, "boss@example.jp", "192.0.2.1", "approve", now=T0 + 1)
    s.rounds(3)
    assert not s.state().carried_out and s.queue.done == []  # that gateway carries it out


def test_a_cancelled_message_an_admin_released_by_hand_goes_as_released() -> None:
    s = Setup(kind="delay")
    s.rounds(1)
    s.book.decide(s.record.id, SENDER, "192.0.2.1", "cancel", now=T0 + 1)
    s.queue.where[QID] = "deferred"  # the admin's postsuper -H came first
    s.rounds(3)
    assert s.queue.done == [("deliver_now", QID)] and s.sent == []
    assert s.state().carried_out


@pytest.mark.parametrize("queue_id", ["-", "", "../../etc", "ABC DEF", "A" * 40, "-d"])
def test_postfix_commands_refuse_what_is_no_queue_id(queue_id: str) -> None:
    """'-' would make postsuper read IDs from its standard input."""
    postfix = PostfixQueue(postsuper="/bin/false", postqueue="/bin/false")
    with pytest.raises(PostfixCommandFailed, match="not a Postfix queue ID"):
        postfix.release(queue_id)
    with pytest.raises(PostfixCommandFailed, match="not a Postfix queue ID"):
        postfix.delete(queue_id)


def test_postqueue_output_that_is_not_its_json_is_a_clear_error(tmp_path: Path) -> None:
    script = tmp_path / "postqueue"
    script.write_text("#!/bin/sh\necho 'postqueue: warning: something else'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(PostfixCommandFailed, match="not its JSON"):
        PostfixQueue(postqueue=str(script)).listing()
    with pytest.raises(PostfixCommandFailed, match="No such file"):
        PostfixQueue(postqueue=str(tmp_path / "missing")).listing()


def test_postsuper_that_did_nothing_is_a_failure(tmp_path: Path) -> None:
    script = tmp_path / "postsuper"
    script.write_text("#!/bin/sh\necho 'postsuper: Released from hold: 0 messages' >&2\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(PostfixCommandFailed, match="released nothing"):
        PostfixQueue(postsuper=str(script), postqueue="/bin/true").release(QID)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from mta.cli import main
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_command_refuses_a_memory_store_a_non_root_user_and_a_missing_postfix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    memory = tmp_path / "memory.yaml"
    memory.write_text("store: memory://\n")
    code, said = run_cli(["postfix-review", "--config", str(memory)], capsys)
    assert code == 1 and "use a sqlite:/// or redis:// store" in said, said
    config = tmp_path / "gateway.yaml"
    config.write_text("store: sqlite:///state.db\n")
    code, said = run_cli(["postfix-review", "--config", str(config), "--postfix-config",
                          str(tmp_path / "no-postfix")], capsys)
    assert code == 1 and "postqueue -c" in said and "Traceback" not in said, said
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    code, said = run_cli(["postfix-review", "--config", str(config)], capsys)
    assert code == 1 and "Postfix reserves to root" in said, said


def test_reviews_past_their_retention_are_forgotten_once_an_hour() -> None:
    """review.retention: the book does not grow without bound (serve's runner shares this)."""
    s = Setup(kind="delay")
    s.runner.retention = 30 * 86400
    s.book.decide(s.record.id, SENDER, "192.0.2.1", "cancel", now=T0 - 1)
    s.rounds(1)  # deleted from hold, told, carried out at T0; the first purge check
    assert s.state().carried_out == T0
    later = s.book.create(new_review(queue_id="9ABCDEF0123", kind="delay", sender=SENDER,
                                     recipients=["x@partner.example"], subject="s",
                                     now=T0, timeout=86400 * 365))
    waiting = s.book.create(new_review(queue_id="9ABCDEF0124", kind="delay", sender=SENDER,
                                       recipients=["x@partner.example"], subject="s",
                                       now=T0, timeout=86400 * 365))
    s.book.withdraw(later.id, "admin", "cli", now=T0 + 1)  # carried out at T0 + 1
    s.now = T0 + 30 * 86400 + 0.5
    s.rounds(1)
    assert s.book.get(s.record.id) is None  # past the retention: gone
    assert s.book.get(later.id) is not None  # not yet past it
    s.now = T0 + 30 * 86400 + 2
    s.rounds(1)  # now past it too, but the last check was under an hour ago
    assert s.book.get(later.id) is not None
    s.now += 3600
    s.rounds(1)
    assert s.book.get(later.id) is None
    assert s.book.get(waiting.id) is not None  # pending: never purged


def test_a_slow_book_does_not_stall_the_event_loop() -> None:
    """serve's SMTP sessions share the runner's event loop: a book call that waits (SQLite's
    write lock, a slow Redis) runs in a worker thread while the loop goes on."""
    import threading
    s = Setup()
    release = threading.Event()
    due = s.book.due

    def slow_due(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)  # as long as the loop has not shown it is alive: bounded
        return due(*args, **kwargs)
    s.book.due = slow_due  # type: ignore[method-assign]

    async def both() -> None:
        round_task = asyncio.create_task(s.runner.round())
        await asyncio.sleep(0.05)  # this runs only if the loop turns while due() waits
        assert not round_task.done()
        release.set()  # only the loop, still running, can let the book go on
        await asyncio.wait_for(round_task, 10)
    asyncio.run(both())
    assert s.state().state == "pending"


def test_approvals_decided_together_leave_hold_in_one_postsuper() -> None:
    s = Setup()
    others = []
    for queue_id in ("8BFD7236037", "8BFD7236038"):
        others.append(s.book.create(new_review(
            queue_id=queue_id, kind="approve", sender=SENDER, approvers=["boss@example.jp"],
            recipients=["x@partner.example"], subject="s", now=T0, timeout=60)))
        s.queue.where[queue_id] = "hold"
    s.queue.stuck = {"8BFD7236038"}  # postsuper did not release this one: one at a time
    for record in (s.record, *others):
        s.book.decide(record.id, "boss@example.jp", "192.0.2.1", "approve", now=T0 + 1)
    s.rounds(3)
    assert s.queue.done[0] == ("release_many", f"{QID},8BFD7236037")
    assert sorted(s.queue.done[1:]) == [("deliver_now", QID), ("deliver_now", "8BFD7236037"),
                                        ("release", "8BFD7236038")]
    assert all(s.book.get(r.id).carried_out for r in (s.record, *others))  # type: ignore[union-attr]


def test_a_result_notice_that_fails_after_the_delete_is_sent_next_round() -> None:
    """Decided before the runner ever saw it pending: the delete succeeds, the notice to the
    sender fails (the re-injection port is down); next round the message is gone, and the
    runner still knows it was its own to finish."""
    s = Setup(kind="delay")
    s.book.decide(s.record.id, SENDER, "192.0.2.1", "cancel", now=T0 + 1)
    failures = [OSError("connection refused")]

    def send(listen: str, frm: str, to: list[str], raw: bytes, t: float) -> str:
        if failures:
            raise failures.pop()
        s.sent.append((to, raw))
        return "250"
    s.runner.send = send
    s.rounds(1)
    assert s.queue.done == [("delete", QID)] and not s.state().carried_out
    s.rounds(2)
    assert s.sent == [([SENDER], b"result cancelled")] and s.state().carried_out
