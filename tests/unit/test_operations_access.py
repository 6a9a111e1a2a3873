"""mta/operations: who may do what with held mail, what each action leaves in the audit
log, partial release and its crash safety, bulk actions, the overview."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mta.console.identity import Actor
from mta.operations import (ActionResult, Forbidden, NotFound, OperationError, Operations,
                            cli_actor)
from mta.queue import split as split_module
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.recording_audit import RecordingAudit

@dataclass(frozen=True)
class OddActor:
    """Any object with an Actor's fields (identity.Actor itself refuses unknown roles)."""

    name: str
    role: str
    addresses: frozenset[str]
    source: str


ADMIN = Actor("alice", "admin", frozenset(), "192.0.2.1")
AUDITOR = Actor("olga", "auditor", frozenset(), "192.0.2.2")
TARO = Actor("taro", "user", frozenset({"taro@example.jp"}), "192.0.2.3")
HANAKO = Actor("hanako", "user", frozenset({"hanako@example.jp"}), "192.0.2.4")


def held(queue: Queue, sender: str, recipients: list[str], subject: str = "hello",
         reason: str = "DMARC quarantine", message_id: str = "<m1@outside.example>") -> str:
    raw = (f"From: {sender}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n\r\n"
           "body\r\n").encode()
    return queue.enqueue(raw, Envelope(new_queue_id(), sender,
                                       [RecipientState(r) for r in recipients],
                                       1_795_900_000.0, hold_reason=reason))


World = tuple[Operations, Queue, RecordingAudit]


@pytest.fixture
def world(tmp_path: Path) -> World:
    queue, audit = Queue(tmp_path / "spool"), RecordingAudit()
    return Operations(queue, audit), queue, audit


def test_a_user_guessing_another_users_queue_id_gets_not_found(world: World) -> None:
    ops, queue, _ = world
    theirs = held(queue, "x@outside.example", ["hanako@example.jp"])
    missing = new_queue_id()
    for call in (ops.message, ops.original, ops.story, ops.delete, ops.release):
        with pytest.raises(NotFound) as guessed:
            call(TARO, theirs)
        with pytest.raises(NotFound) as absent:
            call(TARO, missing)
        # The same words, but for the ID each names: nothing tells them apart.
        assert str(guessed.value).replace(theirs, "ID") == str(absent.value).replace(missing, "ID")
    assert ops.held(TARO).items == [] and ops.held(TARO, query=theirs).total == 0
    assert queue.envelope(theirs).hold_reason == "DMARC quarantine"  # untouched
    assert ops.message(HANAKO, theirs).queue_id == theirs
    for junk in ("../../etc/passwd", "A" * 10_000, "a\x00b", ""):  # paths and junk as IDs
        for call in (ops.message, ops.release, ops.delete, ops.original):
            with pytest.raises(NotFound, match=r"\(not a queue ID\)|no queued message A+$"):
                call(ADMIN, junk)


def test_address_match_is_exact_and_case_insensitive(world: World) -> None:
    ops, queue, _ = world
    near = held(queue, "", ["xtaro@example.jp", "taro@example.jp.evil", "aro@example.jp",
                            "example.jp"])
    mine = held(queue, "x@outside.example", ["TARO@Example.JP"])
    assert [item.queue_id for item in ops.held(TARO).items] == [mine]
    with pytest.raises(NotFound):
        ops.message(TARO, near)


def test_a_recipient_does_not_see_the_other_recipients_the_sender_does(world: World) -> None:
    ops, queue, _ = world
    queue_id = held(queue, "hanako@example.jp", ["taro@example.jp", "secret-bcc@example.jp"])
    [item] = ops.held(TARO).items
    assert item.recipients == ["taro@example.jp"]
    assert [r["address"] for r in ops.message(TARO, queue_id).envelope["recipients"]] == [
        "taro@example.jp"]
    assert ops.held(HANAKO).items[0].recipients == ["taro@example.jp", "secret-bcc@example.jp"]


def test_auditor_reads_everything_and_changes_nothing(world: World) -> None:
    ops, queue, audit = world
    queue_id = held(queue, "x@outside.example", ["taro@example.jp"])
    assert ops.held(AUDITOR).total == 1 and ops.message(AUDITOR, queue_id).subject == "hello"
    for call in (lambda: ops.release(AUDITOR, queue_id), lambda: ops.delete(AUDITOR, queue_id),
                 lambda: ops.original(AUDITOR, queue_id), lambda: ops.hold(AUDITOR, queue_id),
                 lambda: ops.bulk(AUDITOR, "release", [queue_id]),
                 lambda: ops.release(AUDITOR, queue_id, ["taro@example.jp"])):
        with pytest.raises(Forbidden):
            call()
    assert queue.envelope(queue_id).hold_reason == "DMARC quarantine" and audit.records == []


def test_a_user_may_not_release_even_their_own_mail(world: World) -> None:
    ops, queue, _ = world
    queue_id = held(queue, "x@outside.example", ["taro@example.jp"])
    with pytest.raises(Forbidden):
        ops.release(TARO, queue_id)
    with pytest.raises(Forbidden):
        ops.original(TARO, queue_id)
    odd = OddActor("mallory", "superuser", frozenset(), "192.0.2.9")  # a mapping mistake
    with pytest.raises(Forbidden):
        ops.held(odd)


def test_each_action_is_in_the_audit_log_with_actor_and_source(world: World) -> None:
    ops, queue, audit = world
    first = held(queue, "x@outside.example", ["taro@example.jp"], message_id="<a@x>")
    second = held(queue, "x@outside.example", ["taro@example.jp"], message_id="<b@x>")
    assert ops.original(ADMIN, first).startswith(b"From: x@outside.example")
    assert ops.release(ADMIN, first) == ActionResult(first, "release", True, "released")
    assert ops.delete(ADMIN, second).ok
    assert [(r.event, r.queue_id, r.message_id, r.actor, r.source) for r in audit.records] == [
        ("downloaded", first, "<a@x>", "console:alice", "192.0.2.1"),
        ("released", first, "<a@x>", "console:alice", "192.0.2.1"),
        ("removed", second, "<b@x>", "console:alice", "192.0.2.1")]
    assert audit.records[1].fields["recipients"] == ["taro@example.jp"]
    assert audit.flushes == 3  # each action written at once
    assert queue.entries()[0].hold_reason is None and len(queue.entries()) == 1
    # The command line's actor is cli:USER; a login that calls itself that is still a login.
    third = held(queue, "x@outside.example", ["taro@example.jp"])
    ops.hold(cli_actor(), third, "checking")
    ops.delete(Actor("cli:root", "admin", frozenset(), "192.0.2.66"), third)
    assert [(r.event, r.actor, r.source) for r in audit.records[3:]] == [
        ("held", cli_actor().name, "cli"), ("removed", "console:cli:root", "192.0.2.66")]
    with pytest.raises(OperationError, match="not on hold"):
        ops.release(ADMIN, first)


def test_partial_release_splits_the_entry(world: World) -> None:
    ops, queue, audit = world
    queue_id = held(queue, "x@outside.example", ["a@example.jp", "b@example.jp", "c@example.jp"])
    result = ops.release(ADMIN, queue_id, ["B@example.jp"])
    assert result.ok and result.action == "release_partly" and result.new_queue_id
    new = queue.envelope(result.new_queue_id)
    assert [r.address for r in new.recipients] == ["b@example.jp"] and new.hold_reason is None
    assert queue.message(result.new_queue_id) == queue.message(queue_id)
    old = queue.envelope(queue_id)
    assert [r.address for r in old.recipients] == ["a@example.jp", "c@example.jp"]
    assert old.hold_reason == "DMARC quarantine"
    assert [env.queue_id for env in queue.due(2e9)] == [result.new_queue_id]
    assert audit.records[-1].event == "released_partly"
    assert audit.records[-1].fields["new_queue_id"] == result.new_queue_id
    with pytest.raises(OperationError, match="no held recipient zed@example.jp"):
        ops.release(ADMIN, queue_id, ["zed@example.jp"])
    with pytest.raises(OperationError, match="at least one"):
        ops.release(ADMIN, queue_id, [])
    # Naming every recipient left is a plain release of the entry itself.
    assert ops.release(ADMIN, queue_id, ["a@example.jp", "c@example.jp"]).action == "release"


def test_a_crash_in_the_middle_of_a_split_loses_nothing_and_delivers_nothing_twice(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    ops, queue, _ = world
    queue_id = held(queue, "x@outside.example", ["a@example.jp", "b@example.jp"])

    def crash(envelope: Envelope) -> None:  # the power fails after step 1
        raise SystemExit("crash")
    monkeypatch.setattr(queue, "update", crash)
    with pytest.raises(SystemExit):
        split_module.split_release(queue, queue_id, ["b@example.jp"])
    monkeypatch.undo()
    assert queue.due(2e9) == []  # both entries held: nothing goes out twice
    assert len(queue.entries()) == 2
    queue.recover()  # as serve does at start
    old, new = sorted(queue.entries(), key=lambda env: env.queue_id != queue_id)
    assert [r.address for r in old.recipients] == ["a@example.jp"] and old.hold_reason
    assert [r.address for r in new.recipients] == ["b@example.jp"] and new.hold_reason
    assert split_module.SPLIT_PENDING not in new.extra and new.extra["split_from"] == queue_id
    assert ops.release(ADMIN, new.queue_id).ok  # the admin releases it again


def test_bulk_with_one_bad_id_does_the_others(world: World) -> None:
    ops, queue, audit = world
    one = held(queue, "x@outside.example", ["taro@example.jp"])
    two = held(queue, "x@outside.example", ["hanako@example.jp"])
    bad = new_queue_id()
    results = ops.bulk(ADMIN, "delete", [one, bad, "../x", two, one])
    assert [(r.queue_id, r.ok) for r in results] == [(one, True), (bad, False), ("../x", False),
                                                     (two, True)]
    assert "no queued message" in results[1].detail
    assert queue.entries() == [] and [r.event for r in audit.records] == ["removed", "removed"]
    with pytest.raises(OperationError, match="must be one of"):
        ops.bulk(ADMIN, "rm -rf", [one])
    with pytest.raises(OperationError, match="at most"):
        ops.bulk(ADMIN, "release", ["X"] * 1001)


def test_search_filter_and_pages(world: World) -> None:
    ops, queue, _ = world
    ids = [held(queue, f"s{i}@outside.example", [f"r{i}@example.jp"], subject=f"件名 {i}",
                reason="DMARC quarantine" if i % 2 else "held for review",
                message_id=f"<id{i}@x>") for i in range(7)]
    assert ops.held(ADMIN).total == 7 and ops.held(ADMIN).items[0].queue_id == ids[-1]
    assert [i.queue_id for i in ops.held(ADMIN, query="件名 3").items] == [ids[3]]
    assert [i.queue_id for i in ops.held(ADMIN, query="R5@EXAMPLE.JP").items] == [ids[5]]
    assert [i.queue_id for i in ops.held(ADMIN, query="<id4@x>").items] == [ids[4]]
    assert [i.queue_id for i in ops.held(ADMIN, query=ids[2]).items] == [ids[2]]
    page = ops.held(ADMIN, reason="held for review", offset=1, limit=2)
    assert page.total == 4 and [i.queue_id for i in page.items] == [ids[4], ids[2]]
    assert page.reasons == {"DMARC quarantine": 3, "held for review": 4}
    assert ops.held(ADMIN, offset=-5, limit=10**9).limit == 500  # odd paging is clamped
    queue.release(ids[0])
    assert ops.held(ADMIN).total == 6  # released mail is not held mail


def test_why_comes_from_the_audit_story(world: World) -> None:
    ops, queue, audit = world
    queue_id = held(queue, "x@outside.example", ["taro@example.jp"])
    audit.append("milter_verdict", queue_id=queue_id, actor="mailmoat/auth", milter="auth",
                 action="quarantine", reason="DMARC p=quarantine for outside.example")
    assert ops.held(ADMIN).items[0].why == "auth: DMARC p=quarantine for outside.example"
    assert ops.message(TARO, queue_id).why == "auth: DMARC p=quarantine for outside.example"


def test_a_users_audit_search_stays_within_their_addresses(world: World) -> None:
    ops, _, audit = world
    audit.append("received", queue_id="A1", sender="x@outside.example",
                 recipients=["taro@example.jp"])
    audit.append("received", queue_id="B2", sender="y@outside.example",
                 recipients=["hanako@example.jp"])
    audit.append("received", queue_id="C3", sender="y@outside.example",
                 recipients=["xtaro@example.jp"])  # a store may match by substring: not ours
    assert [r.queue_id for r in ops.search_audit(TARO)] == ["A1"]
    assert ops.search_audit(TARO, address="hanako@example.jp") == []
    assert [r.queue_id for r in ops.search_audit(AUDITOR)] == ["A1", "B2", "C3"]
    assert [r.queue_id for r in ops.story(TARO, "A1")] == ["A1"]  # delivered, gone: by record
    with pytest.raises(NotFound):
        ops.story(TARO, "B2")


def test_a_recipient_reading_the_story_does_not_learn_the_other_recipients(
        world: World) -> None:
    """The records as the tee writes them (queued: rcpts comma-joined; the attachments
    event: notice_to): a recipient sees only their own address in each list, as in the
    message view (the others may have been Bcc); the sender sees them all."""
    ops, _, audit = world
    audit.append("queued", queue_id="Q1", sender="boss@example.jp", nrcpt=3,
                 rcpts="taro@example.jp,hanako@example.jp,secret@partner.example")
    audit.append("encrypted", queue_id="Q1", actor="mailmoat/attachments",
                 notice_to="taro@example.jp,secret@partner.example")
    audit.append("delivered", queue_id="Q1", rcpt="secret@partner.example")
    taro_view = ops.story(TARO, "Q1")
    assert [r.fields.get("rcpts") for r in taro_view] == ["taro@example.jp", None, None]
    assert taro_view[1].fields["notice_to"] == "taro@example.jp"
    assert taro_view[2].fields["rcpt"] == ""
    assert "secret@partner.example" not in repr(ops.search_audit(TARO))
    boss = Actor("boss", "user", frozenset({"boss@example.jp"}), "192.0.2.9")
    assert ops.story(boss, "Q1")[0].fields["rcpts"].count("@") == 3
    assert ops.story(ADMIN, "Q1")[1].fields["notice_to"].count("@") == 2
    with pytest.raises(NotFound):  # rcpts is read as addresses, not as one string
        ops.story(Actor("x", "user", frozenset({"o@example.jp"}), "192.0.2.8"), "Q1")


def test_overview_counts_and_top_sources(tmp_path: Path) -> None:
    import ipaddress
    from milters.core.store import MemoryStore
    from milters.ratelimit.limiter import points_key
    store, audit = MemoryStore(), RecordingAudit()
    now = 1_795_903_000.0  # 40 minutes past an hour
    hour = now - now % 3600
    for event, at in (("queued", hour + 5), ("queued", hour - 10), ("delivered", hour + 6),
                      ("encrypted", hour + 7), ("bounced", hour - 3600 * 30)):
        audit.append(event, queue_id="Q", now=at)
    for ip, points in (("192.0.2.7", 9.0), ("2001:db8::1", 30.0), ("192.0.2.8", 1.0)):
        store.points_add(points_key(ipaddress.ip_address(ip)), points, half_life=3600, now=now)
    ops = Operations(Queue(tmp_path / "spool"), audit, store)
    view = ops.overview(ADMIN, now=now, step=3600, buckets=3)
    assert view.starts == [hour - 7200, hour - 3600, hour]
    assert view.series["received"] == [0, 1, 1] and view.series["delivered"] == [0, 0, 1]
    assert view.totals["bounced"] == 0 and view.totals["encrypted"] == 1
    assert [(s.ip, s.points) for s in view.top_sources] == [
        ("2001:db8::1", 30.0), ("192.0.2.7", 9.0), ("192.0.2.8", 1.0)]
    assert ops.overview(AUDITOR, now=now, step=86400, buckets=2).totals["bounced"] == 1
    with pytest.raises(Forbidden):
        ops.overview(TARO, now=now, step=3600, buckets=3)
    with pytest.raises(OperationError, match="step"):
        ops.overview(ADMIN, now=now, step=7, buckets=3)


def test_two_admins_releasing_at_once_split_once(world: World,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two consoles press release on the same recipient together: one new entry, not two."""
    import threading
    ops, queue, _ = world
    queue_id = held(queue, "x@outside.example", ["a@example.jp", "b@example.jp"])
    inside, go = threading.Event(), threading.Event()
    real_receive = queue.receive

    def slow_receive(new_id: str):  # type: ignore[no-untyped-def]
        if not inside.is_set():  # the first release waits here, inside the lock
            inside.set()
            go.wait(10)
        return real_receive(new_id)
    monkeypatch.setattr(queue, "receive", slow_receive)
    outcomes: list[object] = []

    def release() -> None:
        try:
            outcomes.append(ops.release(ADMIN, queue_id, ["b@example.jp"]))
        except OperationError as exc:
            outcomes.append(exc)
    first = threading.Thread(target=release)
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=release)
    second.start()
    second.join(0.5)  # it waits for the lock (without one it would split a second time)
    go.set()
    first.join(10)
    second.join(10)
    assert sorted(type(o).__name__ for o in outcomes) == ["ActionResult", "OperationError"]
    assert sorted(r.address for env in queue.entries() for r in env.recipients) == [
        "a@example.jp", "b@example.jp"]
