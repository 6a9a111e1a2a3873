"""The review book's contract, one set of tests for every backend (memory and SQLite here;
Redis in tests/integration/test_review_book_redis.py subclasses BookContract): create, get,
decide with its refusals, due, pending_for, escalate, single-use tokens, and two deciders
at once of whom exactly one wins."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from milters.core.config import load_config
from milters.core.errors import ReviewError, ReviewRefused, StoreError
from milters.core.review import (MemoryReviewBook, ReviewBook, ReviewRecord, SqliteReviewBook,
                                 new_review, open_review_book, parse_review_reason,
                                 review_reason)

T0 = 1_700_000_000.0
SENDER = "taro@example.jp"
BOSS, CIO = "boss@example.jp", "cio@example.jp"


def review(kind: str = "delay", **over: Any) -> ReviewRecord:
    values: dict[str, Any] = dict(queue_id="4F2A1", kind=kind, sender="Taro@Example.JP",
                                  recipients=["x@partner.example", "y@other.example"],
                                  subject="見積書の送付", attachments=["見積書.pdf"],
                                  size=120_000, now=T0, timeout=300.0)
    if kind == "approve":
        values.update(approvers=[BOSS, CIO], timeout=3600.0)
    values.update(over)
    return new_review(**values)


def refused(reason: str, call: Any, *args: Any, **kwargs: Any) -> ReviewRefused:
    with pytest.raises(ReviewRefused) as caught:
        call(*args, **kwargs)
    assert caught.value.reason == reason, caught.value
    return caught.value


class BookContract:
    """Every backend passes these; a subclass gives the `book` fixture."""

    def test_a_created_record_is_read_back_whole(self, book: ReviewBook) -> None:
        record = book.create(review("approve", outside=["x@partner.example"],
                                    message_id="<a@example.jp>", language="en"))
        assert book.get(record.id) == record
        assert record.sender == SENDER and record.deadline == T0 + 3600
        assert record.approver == BOSS and record.state == "pending"

    def test_ids_that_are_not_ours_find_nothing(self, book: ReviewBook) -> None:
        book.create(review())
        for guess in ("0" * 32, "../../etc/passwd", "", "A" * 32, "x" * 10_000, None, 42,
                      "0" * 31 + "\n"):
            assert book.get(guess) is None  # type: ignore[arg-type]
        refused("unknown", book.decide, "0" * 32, SENDER, "192.0.2.9", "cancel", now=T0)
        refused("unknown", book.decide, "zz", SENDER, "192.0.2.9", "cancel", now=T0)

    def test_a_taken_id_or_a_bad_record_is_not_kept(self, book: ReviewBook) -> None:
        record = book.create(review())
        with pytest.raises(ReviewError, match="exists"):
            book.create(record)
        with pytest.raises(ReviewError, match="approver"):
            review("approve", approvers=[])
        with pytest.raises(ReviewError, match="kind"):
            review("send")
        decided = book.decide(record.id, SENDER, "192.0.2.9", "cancel", now=T0 + 1)
        with pytest.raises(ReviewError):
            book.create(type(decided)(**{**decided.__dict__, "id": "1" * 32}))
        assert book.get(record.id).state == "cancelled"  # the refused create changed nothing

    def test_the_sender_cancels_a_delay_and_the_decision_is_recorded(
            self, book: ReviewBook) -> None:
        record = book.create(review())
        new = book.decide(record.id, "TARO@example.jp", "192.0.2.9", "cancel", now=T0 + 10)
        assert new.state == "cancelled" and book.get(record.id) == new
        [decision] = new.decisions
        assert (decision.time, decision.who, decision.source, decision.action) == (
            T0 + 10, SENDER, "192.0.2.9", "cancel")
        refused("decided", book.decide, record.id, SENDER, "192.0.2.9", "send_now",
                now=T0 + 11)
        assert book.get(record.id).decisions == new.decisions

    def test_only_the_sender_may_send_now_or_cancel(self, book: ReviewBook) -> None:
        record = book.create(review())
        for who in ("x@partner.example", BOSS, "taro@example.jp.evil", ""):
            refused("wrong_person", book.decide, record.id, who, "192.0.2.9", "cancel",
                    now=T0 + 1)
        assert book.decide(record.id, SENDER, "192.0.2.9", "send_now",
                           now=T0 + 1).state == "sent"

    def test_an_admin_override_decides_for_the_sender(self, book: ReviewBook) -> None:
        record = book.create(review("confirm"))
        new = book.decide(record.id, "console:alice", "192.0.2.9", "confirm", now=T0 + 1,
                          override=True)
        assert new.state == "sent" and new.decisions[-1].who == "console:alice"

    def test_actions_of_another_kind_are_refused(self, book: ReviewBook) -> None:
        delay, confirm = book.create(review()), book.create(review("confirm"))
        refused("wrong_action", book.decide, delay.id, SENDER, "s", "confirm", now=T0)
        refused("wrong_action", book.decide, confirm.id, SENDER, "s", "approve", now=T0)
        refused("wrong_action", book.decide, confirm.id, SENDER, "s", "delete", now=T0)
        refused("wrong_action", book.decide, confirm.id, SENDER, "s", "timeout", now=T0 + 999)
        assert book.decide(confirm.id, SENDER, "s", "confirm", now=T0).state == "sent"

    def test_an_approver_approves_or_rejects_with_a_reason(self, book: ReviewBook) -> None:
        one, two = book.create(review("approve")), book.create(review("approve"))
        refused("wrong_person", book.decide, one.id, "x@partner.example", "s", "approve",
                now=T0)
        refused("wrong_person", book.decide, one.id, CIO, "s", "approve", now=T0)  # not yet
        assert book.decide(one.id, BOSS, "s", "approve", now=T0).state == "approved"
        new = book.decide(two.id, BOSS, "s", "reject", "宛先が社外です\n確認を", now=T0)
        assert (new.state, new.decisions[-1].reason) == ("rejected", "宛先が社外です\n確認を")

    def test_self_approval_is_refused_unless_the_rule_allows_it(self, book: ReviewBook) -> None:
        no = book.create(review("approve", approvers=[SENDER, BOSS]))
        yes = book.create(review("approve", approvers=[SENDER], self_approval=True))
        refused("self_approval", book.decide, no.id, SENDER, "s", "approve", now=T0)
        refused("self_approval", book.decide, no.id, SENDER, "s", "approve", now=T0,
                override=True)
        assert book.get(no.id).state == "pending"
        assert book.decide(yes.id, SENDER, "s", "approve", now=T0).state == "approved"
        # The sender may always withdraw their own message.
        assert book.decide(no.id, SENDER, "s", "cancel", now=T0).state == "cancelled"

    def test_after_the_deadline_people_are_refused_and_the_timer_decides(
            self, book: ReviewBook) -> None:
        delay, confirm = book.create(review()), book.create(review("confirm"))
        sent = book.create(review("approve", on_timeout="send"))
        refused("not_due", book.decide, delay.id, "timer", "timer", "timeout", now=T0 + 299)
        refused("expired", book.decide, delay.id, SENDER, "s", "cancel", now=T0 + 300)
        refused("wrong_action", book.decide, delay.id, SENDER, "s", "timeout", now=T0 + 300)
        assert book.decide(delay.id, "timer", "timer", "timeout", now=T0 + 300).state == "sent"
        assert book.decide(confirm.id, "timer", "timer", "timeout",
                           now=T0 + 301).state == "expired"
        assert book.decide(sent.id, "timer", "timer", "timeout",
                           now=T0 + 3600).state == "sent"

    def test_due_lists_pending_records_past_their_deadline_earliest_first(
            self, book: ReviewBook) -> None:
        late = book.create(review(timeout=600))
        early = book.create(review(timeout=60))
        gone = book.create(review(timeout=30))
        book.create(review(timeout=6000))
        book.decide(gone.id, SENDER, "s", "cancel", now=T0)
        assert book.due(T0 + 59) == []
        assert [r.id for r in book.due(T0 + 600)] == [early.id, late.id]
        assert [r.id for r in book.due(T0 + 600, limit=1)] == [early.id]
        book.decide(early.id, "timer", "timer", "timeout", now=T0 + 600)
        assert [r.id for r in book.due(T0 + 600)] == [late.id]

    def test_pending_for_lists_a_persons_own_and_awaited_reviews(
            self, book: ReviewBook) -> None:
        mine = book.create(review())
        asks = book.create(review("approve", on_timeout="escalate"))
        other = book.create(review(sender="hanako@example.jp"))
        done = book.create(review())
        book.decide(done.id, SENDER, "s", "cancel", now=T0)
        lists = book.pending_for("Taro@Example.jp")
        assert {r.id for r in lists.as_sender} == {mine.id, asks.id} and not lists.as_approver
        assert [r.id for r in book.pending_for(BOSS).as_approver] == [asks.id]
        assert book.pending_for(CIO).as_approver == []
        assert [r.id for r in book.pending_for("hanako@example.jp").as_sender] == [other.id]
        book.escalate(asks.id, now=T0 + 3600)
        assert [r.id for r in book.pending_for(CIO).as_approver] == [asks.id]

    def test_pending_lists_every_pending_record_earliest_deadline_first(
            self, book: ReviewBook) -> None:
        assert book.pending() == []
        late = book.create(review(timeout=900.0))
        early = book.create(review("approve", sender="hanako@example.jp"))
        soon = book.create(review(timeout=60.0))
        gone = book.create(review())
        book.decide(gone.id, SENDER, "s", "cancel", now=T0)
        assert [r.id for r in book.pending()] == [soon.id, late.id, early.id]
        assert book.pending()[0] == book.get(soon.id)
        assert [r.id for r in book.pending(limit=2)] == [soon.id, late.id]
        assert book.pending(limit=0) == [] and book.pending(limit=-5) == []
        book.decide(late.id, SENDER, "s", "send_now", now=T0 + 1)
        assert [r.id for r in book.pending()] == [soon.id, early.id]

    def test_withdraw_cancels_a_held_review_whose_message_was_deleted(
            self, book: ReviewBook) -> None:
        waiting = book.create(review("approve"))
        late = book.create(review())  # past its deadline, not yet timed out
        done = book.create(review())
        book.decide(done.id, SENDER, "s", "send_now", now=T0 + 1)
        gone = book.withdraw(waiting.id, "cli:root", "cli", "deleted from the queue",
                             now=T0 + 5)
        assert gone.state == "cancelled" and gone.carried_out == T0 + 5
        assert gone.decisions[-1].who == "cli:root" and gone.decisions[-1].action == "cancel"
        assert book.get(waiting.id) == gone
        assert book.withdraw(late.id, "console:alice", "192.0.2.7\r\nX: y",
                             now=T0 + 9999).state == "cancelled"
        assert "\n" not in book.get(late.id).decisions[-1].source
        decided = book.withdraw(done.id, "cli:root", "cli", now=T0 + 6)
        assert decided.state == "sent" and decided.carried_out == T0 + 6
        assert book.pending() == [] and book.undone() == [] and book.due(T0 + 99999) == []
        assert book.withdraw(done.id, "x", "y", now=T0 + 7) == decided  # once is enough
        refused("decided", book.decide, waiting.id, BOSS, "s", "approve", now=T0 + 6)
        refused("carried_out", book.carry_out, waiting.id, now=T0 + 6)
        refused("unknown", book.withdraw, "0" * 32, "x", "y")
        refused("unknown", book.withdraw, "../x", "x", "y")

    def test_escalation_hands_over_with_a_new_deadline(self, book: ReviewBook) -> None:
        record = book.create(review("approve", on_timeout="escalate"))
        refused("not_due", book.escalate, record.id, now=T0 + 10)
        refused("wrong_action", book.decide, record.id, "timer", "timer", "timeout",
                now=T0 + 3600)
        new = book.escalate(record.id, now=T0 + 4000)
        assert (new.step, new.approver, new.deadline) == (1, CIO, T0 + 4000 + 3600)
        assert new.decisions[-1].action == "escalate" and book.get(record.id) == new
        assert book.due(T0 + 4001) == []
        refused("no_next_approver", book.escalate, record.id, now=T0 + 9000)
        # Nobody left: the timer's timeout ends it unsent.
        assert book.decide(record.id, "timer", "timer", "timeout",
                           now=T0 + 9000).state == "expired"
        delay = book.create(review())
        refused("wrong_action", book.escalate, delay.id, now=T0 + 9000)

    def test_after_escalation_both_approvers_may_decide(self, book: ReviewBook) -> None:
        one = book.create(review("approve", on_timeout="escalate"))
        two = book.create(review("approve", on_timeout="escalate"))
        book.escalate(one.id, now=T0 + 3600)
        book.escalate(two.id, now=T0 + 3600)
        assert book.decide(one.id, CIO, "s", "approve", now=T0 + 3601).state == "approved"
        assert book.decide(two.id, BOSS, "s", "reject", now=T0 + 3601).state == "rejected"

    def test_a_token_is_used_once_and_a_refused_decision_uses_nothing(
            self, book: ReviewBook) -> None:
        record = book.create(review("approve"))
        refused("wrong_person", book.decide, record.id, "x@partner.example", "s", "approve",
                now=T0, token_id="t1")
        assert not book.token_used(record.id, "t1")  # rolled back with the refusal
        book.decide(record.id, BOSS, "s", "reject", "no", now=T0, token_id="t1")
        assert book.token_used(record.id, "t1") and not book.token_used(record.id, "t2")
        refused("token_used", book.decide, record.id, BOSS, "s", "reject", now=T0,
                token_id="t1")
        assert not book.token_used("not an id", "t1")

    def test_two_deciders_at_once_exactly_one_wins(self, book: ReviewBook) -> None:
        # The sender cancels while the approver approves or rejects, from eight threads:
        # each record gets exactly one decision, every other attempt reads it and is refused.
        records = [book.create(review("approve")) for _ in range(20)]
        wins: list[tuple[str, str]] = []
        losses: list[str] = []
        start = threading.Barrier(8)

        def decide(n: int) -> None:
            who, action = [(SENDER, "cancel"), (BOSS, "approve"), (BOSS, "reject")][n % 3]
            start.wait(timeout=10)
            for record in records:
                try:
                    book.decide(record.id, who, f"t{n}", action, now=T0, token_id=f"k{n}")
                    wins.append((record.id, f"t{n}"))
                except ReviewRefused as exc:
                    losses.append(exc.reason)

        threads = [threading.Thread(target=decide, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sorted(r for r, _ in wins) == sorted(r.id for r in records)  # one each
        assert losses == ["decided"] * (7 * len(records))
        for record in records:
            [winner] = [source for r, source in wins if r == record.id]
            [decision] = book.get(record.id).decisions
            assert decision.source == winner

    def test_a_decision_is_carried_out_once_and_leaves_the_undone_list(
            self, book: ReviewBook) -> None:
        sent, cancelled, waiting = (book.create(review()) for _ in range(3))
        assert book.undone() == []
        refused("pending", book.carry_out, waiting.id, now=T0 + 1)
        book.decide(cancelled.id, SENDER, "192.0.2.9", "cancel", now=T0 + 5)
        book.decide(sent.id, "timer", "timer", "timeout", now=T0 + 300)
        assert [r.id for r in book.undone()] == [cancelled.id, sent.id]  # decided first, first
        done = book.carry_out(cancelled.id, now=T0 + 301)
        assert done.carried_out == T0 + 301 and book.get(cancelled.id) == done
        refused("carried_out", book.carry_out, cancelled.id, now=T0 + 302)
        assert [r.id for r in book.undone()] == [sent.id]
        assert [r.id for r in book.undone(limit=0)] == []
        book.carry_out(sent.id, now=T0 + 303)
        assert book.undone() == [] and book.get(waiting.id).state == "pending"
        refused("unknown", book.carry_out, "0" * 32)

    def test_purge_forgets_only_reviews_carried_out_before_the_cut(
            self, book: ReviewBook) -> None:
        old, recent, owed, waiting = (book.create(review()) for _ in range(4))
        for record in (old, recent, owed):
            book.decide(record.id, SENDER, "192.0.2.9", "send_now", now=T0 + 1)
        link = "a" * 43  # a used link token of the old review
        book.decide(waiting.id, SENDER, "192.0.2.9", "cancel", now=T0 + 1, token_id=link)
        book.carry_out(waiting.id, now=T0 + 10)
        book.carry_out(old.id, now=T0 + 10)
        book.carry_out(recent.id, now=T0 + 1000)
        assert book.purge(before=T0 + 10) == 0  # "before" is strict
        assert book.purge(before=T0 + 500, limit=1) == 1
        assert book.purge(before=T0 + 500) == 1
        assert book.get(old.id) is None and book.get(waiting.id) is None
        assert not book.token_used(waiting.id, link)
        # Not yet carried out (the message still held) or carried out later: kept.
        assert book.get(owed.id) is not None and book.get(recent.id) is not None
        assert [r.id for r in book.undone()] == [owed.id]
        assert book.purge(before=T0 + 500) == 0

    def test_two_carriers_at_once_one_marks(self, book: ReviewBook) -> None:
        record = book.create(review())
        book.decide(record.id, SENDER, "192.0.2.9", "send_now", now=T0 + 1)
        wins: list[int] = []
        losses: list[str] = []

        def carry(number: int) -> None:
            try:
                book.carry_out(record.id, now=T0 + 2)
                wins.append(number)
            except ReviewRefused as exc:
                losses.append(exc.reason)
        threads = [threading.Thread(target=carry, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(wins) == 1 and losses == ["carried_out"] * 5


class TestMemoryBook(BookContract):
    @pytest.fixture
    def book(self) -> ReviewBook:
        return MemoryReviewBook()


class TestSqliteBook(BookContract):
    @pytest.fixture
    def book(self, tmp_path: Path) -> Iterator[ReviewBook]:
        made = SqliteReviewBook(str(tmp_path / "state-review.db"))
        yield made
        made.close()


def test_sqlite_records_survive_a_reopen(tmp_path: Path) -> None:
    book = SqliteReviewBook(str(tmp_path / "r.db"))
    record = book.create(review("approve"))
    book.decide(record.id, BOSS, "s", "approve", now=T0, token_id="t")
    book.close()
    again = SqliteReviewBook(str(tmp_path / "r.db"))
    assert again.get(record.id).state == "approved" and again.token_used(record.id, "t")


def test_the_book_is_opened_where_the_config_says(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("store: sqlite:///var/state.db\n")
    book = open_review_book(load_config(config))
    assert isinstance(book, SqliteReviewBook)
    assert book.path == str(tmp_path / "var" / "state-review.db")
    config.write_text("store: sqlite:///var/state.db\nreview: {file: other/rv.db}\n")
    assert open_review_book(load_config(config)).path == str(tmp_path / "other" / "rv.db")
    config.write_text("store: memory://\n")
    assert isinstance(open_review_book(load_config(config)), MemoryReviewBook)
    with pytest.raises(StoreError):
        SqliteReviewBook(":memory:")


def test_the_quarantine_reason_names_kind_and_id_and_nothing_else_parses() -> None:
    record = review("confirm")
    assert review_reason(record) == f"mailmoat-review confirm {record.id}"
    assert parse_review_reason(review_reason(record)) == ("confirm", record.id)
    for other in (None, "", "mailmoat-review send " + record.id, "policy: ppap",
                  f"mailmoat-review confirm {record.id} extra",
                  f"mailmoat-review confirm {record.id.upper()}"):
        assert parse_review_reason(other) is None


def test_a_message_cannot_bloat_or_break_a_record() -> None:
    record = review(subject="A\r\nBcc: x@evil.example\x00" + "x" * 100_000,
                    recipients=[f"r{i}@x.example" for i in range(5000)],
                    attachments=["a\nb.pdf"] * 3, size=-5)
    assert "\n" not in record.subject and "\r" not in record.subject
    assert len(record.subject) <= 998 and len(record.recipients) == 1000
    assert record.attachments == ("a b.pdf",) * 3 and record.size == 0
    assert ReviewRecord.from_json(record.to_json()) == record


def test_the_review_block_refuses_odd_urls_and_addresses_with_the_place(tmp_path: Path) -> None:
    from milters.core.errors import ConfigError
    from milters.core.review import console_url, notice_from
    config = tmp_path / "gateway.yaml"
    config.write_text("gateway: {hostname: mx.example.jp}\nconsole: {listen: '127.0.0.1:9026'}\n")
    loaded = load_config(config)
    assert console_url(loaded) == "http://127.0.0.1:9026"
    assert notice_from(loaded) == "mailmoat-review@mx.example.jp"
    for bad in ('{console_url: "javascript:alert(1)"}', '{console_url: "https://x/?a=1"}',
                '{console_url: "https://x/ y"}', '{notice_from: "a\\r\\nBcc: b@c"}',
                '{notice_from: "<a@b>"}', '{token_key: "secret"}'):
        config.write_text(f"review: {bad}\n")
        with pytest.raises(ConfigError, match=rf"{config}:1:\d+: review"):
            load_config(config)
