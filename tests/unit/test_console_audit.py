"""The audit pages and their API over the real Operations, a real spool and the real audit
log (memory and SQLite), with records written by the tee as the gateway's processes write
them: search by each criterion, a story, what a user may see, hostile and huge values,
bad input, and the chain check (intact, tampered, refused to a user, one at a time)."""
from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from starlette.testclient import TestClient

from milters.core.audit import AuditLog, MemoryAuditLog, SqliteAuditLog
from milters.core.audit.tee import AuditTee
from milters.core.config import ConsoleSettings
from milters.core.eventlog import log_event
from mta.console.app import create_app
from mta.console.identity import Actor
from mta.console.security import CSP
from mta.operations import Forbidden, Operations
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.console_login import ACCOUNTS, StandInLogin

KEY = b"audit-pages-test-key-" * 3
ADMIN, AUDITOR, USER = "alice", "audrey", "taro@example.jp"
DAY = 86400.0


@pytest.fixture(params=["memory", "sqlite"])
def audit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditLog]:
    log: AuditLog = MemoryAuditLog() if request.param == "memory" \
        else SqliteAuditLog(str(tmp_path / "state-audit.db"))
    yield log
    log.close()


@pytest.fixture
def tee(audit: AuditLog) -> Iterator[AuditLog]:
    """The tee of a serve process on the mailmoat logger: log_event lines become records."""
    logger = logging.getLogger("mailmoat")
    handler, level = AuditTee(audit, "serve"), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield audit
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class World:
    def __init__(self, tmp_path: Path, audit: AuditLog | None) -> None:
        self.queue = Queue(tmp_path / "spool")
        self.ops = Operations(self.queue, audit)
        self.app = create_app(ConsoleSettings(), key=KEY, authenticate=StandInLogin(),
                              operations=self.ops)

    def client(self, name: str) -> TestClient:
        client = TestClient(self.app, base_url="http://127.0.0.1")
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
        assert token
        reply = client.post("/login", data={"csrf_token": token.group(1), "name": name,
                                            "password": ACCOUNTS[name][0]},
                            follow_redirects=False)
        assert reply.status_code == 303, reply.text
        return client


def story_of(queue_id: str, sender: str, rcpt: str, message_id: str) -> None:
    """What serve's processes log for one message (the tee turns each into a record)."""
    log_event("milter_passed", milter="attachments", edits=1, queue_id=queue_id)
    log_event("attachments", milter="attachments", queue_id=queue_id, action="encrypt",
              zip="AttachFile.20261206.zip", rcpts=rcpt, notice_to=sender, files=1,
              password="never-recorded")
    log_event("queued", queue_id=queue_id, ip="192.0.2.7", helo="mail.outside.example",
              sender=sender, nrcpt=1, rcpts=rcpt, size=2048, message_id=message_id,
              held=None)
    log_event("delivered", queue_id=queue_id, to=rcpt, relay="127.0.0.1:25",
              reply="250 ok")


@pytest.fixture
def world(tmp_path: Path, tee: AuditLog) -> World:
    story_of("Q1AAA", "boss@outside.example", "taro@example.jp", "<m1@outside.example>")
    story_of("Q2BBB", "spam@outside.example", "hanako@example.jp", "<m2@outside.example>")
    tee.flush()
    return World(tmp_path, tee)


def rows(html: str) -> list[str]:
    """The seq of each record row on a search page, in order."""
    return re.findall(r'<tr data-seq="(\d+)">', html)


def test_search_by_queue_id_message_id_address_text_and_event(world: World) -> None:
    client = world.client(ADMIN)
    page = client.get("/audit")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert len(rows(page.text)) == 8 and page.headers["cache-control"] == "no-store"
    assert rows(page.text) == sorted(rows(page.text), key=int, reverse=True)  # newest first
    by_queue = client.get("/audit", params={"queue_id": "Q2BBB"}).text
    assert len(rows(by_queue)) == 4 and "Q1AAA" not in by_queue
    by_message_id = client.get("/audit", params={"message_id": "<m1@outside.example>"}).text
    assert len(rows(by_message_id)) == 1 and "&lt;m1@outside.example&gt;" in by_message_id
    by_address = client.get("/audit", params={"address": "Hanako@Example.JP"}).text
    assert "Q2BBB" in by_address and "Q1AAA" not in by_address
    by_event = client.get("/audit", params={"event": "encrypted"}).text
    assert len(rows(by_event)) == 2 and "AttachFile.20261206.zip" in by_event
    by_text = client.get("/audit", params={"text": "spam@"}).text
    assert "Q2BBB" in by_text and "Q1AAA" not in by_text
    assert 'href="/audit/Q1AAA"' in page.text  # each queue ID links to its story
    assert "never-recorded" not in page.text  # the tee dropped the password
    api = client.get("/api/audit", params={"queue_id": "Q1AAA", "limit": "2"}).json()
    assert [r["event"] for r in api["records"]] == ["delivered", "queued"]
    assert api["records"][0]["hash"] and api["records"][0]["fields"]["to"] == "taro@example.jp"


def test_search_by_dates(tmp_path: Path, audit: AuditLog) -> None:
    day = time.mktime((2026, 12, 6, 0, 0, 0, 0, 0, -1))  # local midnight, as the form means
    for n, at in enumerate((day - 60, day + 60, day + DAY - 60, day + DAY + 60)):
        audit.append("delivered", queue_id=f"D{n}", actor="mailmoat/delivery",
                     to="a@example.jp", now=at)
    audit.flush()
    client = World(tmp_path, audit).client(AUDITOR)
    one_day = client.get("/audit", params={"since": "2026-12-06", "until": "2026-12-06"}).text
    assert re.findall(r'href="/audit/(D\d)"', one_day) == ["D2", "D1"]
    to_the_minute = client.get("/audit", params={"since": "2026-12-06T00:02"}).text
    assert re.findall(r'href="/audit/(D\d)"', to_the_minute) == ["D3", "D2"]
    api = client.get("/api/audit", params={"until": "2026-12-05"}).json()
    assert [r["queue_id"] for r in api["records"]] == ["D0"]


def test_a_story_shows_every_record_in_order_with_the_chain_hashes(world: World) -> None:
    client = world.client(AUDITOR)
    page = client.get("/audit/Q1AAA")
    assert page.status_code == 200
    events = re.findall(r'data-event="([a-z_]+)"', page.text)
    assert events == ["milter_passed", "encrypted", "queued", "delivered"]
    assert "AttachFile.20261206.zip" in page.text and "boss@outside.example" in page.text
    records = world.ops.story(Actor(AUDITOR, "auditor", frozenset(), "x"), "Q1AAA")
    first = records[0]
    assert f'title="{first.hash}">{first.hash[:12]}</code>' in page.text
    assert "never-recorded" not in page.text
    assert 'id="verify-link"' in page.text
    api = client.get("/api/audit/Q1AAA").json()
    assert api["queue_id"] == "Q1AAA" and [r["seq"] for r in api["records"]] == [
        r.seq for r in records]


def test_a_user_sees_only_the_records_of_their_own_mail(world: World) -> None:
    client = world.client(USER)
    page = client.get("/audit").text
    assert "Q1AAA" in page and "Q2BBB" not in page and "hanako" not in page
    # Theirs: the records that name them (queued, encrypted, delivered), not the milter's.
    assert re.findall(r'<span class="event">(\w+)</span>', page) == [
        "delivered", "queued", "encrypted"]
    assert 'id="verify-link"' not in page
    # Asking for someone else's address or queue ID finds nothing of theirs.
    assert rows(client.get("/audit", params={"address": "hanako@example.jp"}).text) == []
    assert rows(client.get("/audit", params={"queue_id": "Q2BBB"}).text) == []
    assert client.get("/api/audit", params={"queue_id": "Q2BBB"}).json() == {"records": []}
    # Guessing a story: the same 404 as a queue ID that never existed.
    theirs, nobody = client.get("/audit/Q2BBB"), client.get(f"/audit/{new_queue_id()}")
    assert theirs.status_code == nobody.status_code == 404
    assert theirs.text.replace("Q2BBB", "X") == nobody.text.replace(
        re.search(r"/audit/(\w+)", nobody.url.path).group(1), "X")  # type: ignore[union-attr]
    api = client.get("/api/audit/Q2BBB")
    assert api.status_code == 404 and api.json()["error"] == "not_found"
    assert client.get("/audit/Q1AAA").status_code == 200  # their own story


@pytest.mark.parametrize("queue_id", ["%2e%2e", "Q" * 5000, "%00", "<script>", "日本語",
                                      "Q1AAA%0d%0aX-Injected:%20yes"])
def test_odd_queue_ids_in_a_story_url_are_a_plain_404(world: World, queue_id: str) -> None:
    client = world.client(ADMIN)
    page = client.get(f"/audit/{queue_id}")
    assert page.status_code == 404 and "<script>" not in page.text
    assert "x-injected" not in page.headers
    api = client.get(f"/api/audit/{queue_id}")
    assert api.status_code == 404 and api.json()["error"] == "not_found"


def test_hostile_and_huge_values_are_shown_as_cut_text(tmp_path: Path, audit: AuditLog) -> None:
    hostile = "<script>document.title='ran'</script><img src=x onerror=alert(1)>"
    audit.append("queued", queue_id="QHOST", message_id=f"<{hostile}@x>",
                 actor=f"mailmoat/{hostile}", source=hostile, sender=f"{hostile}@x.jp",
                 subject="件名" * 500 + "TAIL-NOT-SHOWN", **{hostile: "key"})
    audit.flush()
    client = World(tmp_path, audit).client(ADMIN)
    for path in ("/audit", "/audit/QHOST", "/audit?queue_id=QHOST"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert "<script>document" not in page.text and "<img src=x" not in page.text
        assert "&lt;script&gt;document.title=" in page.text
        assert "TAIL-NOT-SHOWN" not in page.text and "件名件名…" in page.text
    api = client.get("/api/audit/QHOST").json()  # the API gives the record as stored
    assert api["records"][0]["fields"]["subject"].endswith("TAIL-NOT-SHOWN")


@pytest.mark.parametrize("params", [
    {"since": "yesterday"}, {"until": "2026-13-40"}, {"since": "99999-01-01"},
    {"until": "2026-12-06T25:00"}, {"address": "a" * 5000}, {"event": "e" * 500},
    {"queue_id": "\x00" * 400},
])
def test_bad_search_input_is_a_clear_400(world: World, params: dict[str, str]) -> None:
    client = world.client(ADMIN)
    page = client.get("/audit", params=params)
    assert page.status_code == 400 and 'id="detail"' in page.text
    assert "Traceback" not in page.text and "This search cannot be done." in page.text
    api = client.get("/api/audit", params=params)
    assert api.status_code == 400 and api.json()["error"] == "bad_request"


def test_odd_but_valid_search_input(world: World) -> None:
    client = world.client(ADMIN)
    # Year 1 is a date (no records then); a limit past the top is cut to it.
    assert rows(client.get("/audit", params={"until": "0001-01-01T00:00"}).text) == []
    assert client.get("/api/audit", params={"limit": "99999999"}).status_code == 200
    assert client.get("/api/audit", params={"limit": "x"}).status_code == 400
    assert client.get("/api/audit", params={"limit": "-1"}).status_code == 400
    assert rows(client.get("/audit", params={"event": "no-such-event"}).text) == []


def test_nothing_without_a_session(world: World) -> None:
    client = TestClient(world.app, base_url="http://127.0.0.1")
    for path in ("/audit", "/audit/Q1AAA", "/audit/verify"):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/login"
    for path in ("/api/audit", "/api/audit/Q1AAA", "/api/audit/verify"):
        assert client.get(path).status_code == 401


def test_verify_intact_then_tampered_and_refused_to_a_user(tmp_path: Path) -> None:
    audit = SqliteAuditLog(str(tmp_path / "state-audit.db"))
    for n in range(5):
        audit.append("delivered", queue_id=f"V{n}", to="taro@example.jp", now=1e9 + n)
    audit.flush()
    world = World(tmp_path, audit)
    admin, auditor, user = world.client(ADMIN), world.client(AUDITOR), world.client(USER)
    page = admin.get("/audit/verify")
    assert page.status_code == 200 and 'data-ok="yes"' in page.text
    assert "Chain intact: 5 records checked." in page.text
    assert auditor.get("/api/audit/verify").json()["ok"] is True
    assert user.get("/audit/verify").status_code == 403
    assert user.get("/api/audit/verify").json()["error"] == "forbidden"
    with sqlite3.connect(tmp_path / "state-audit.db") as db:
        db.execute("UPDATE audit SET fields = '{\"to\":\"mallory@example.jp\"}' WHERE seq = 3")
    broken = auditor.get("/audit/verify", headers={"accept-language": "ja"})
    assert broken.status_code == 200 and 'data-ok="no"' in broken.text
    assert "記録 3:" in broken.text
    result = admin.get("/api/audit/verify").json()
    assert (result["ok"], result["first_bad_seq"]) == (False, 3)
    audit.close()


def test_one_chain_check_at_a_time(tmp_path: Path) -> None:
    """A check reads the whole log: a second one while it runs is told to wait (429)."""
    started, release = threading.Event(), threading.Event()

    class SlowLog(MemoryAuditLog):
        def verify(self) -> Any:
            started.set()
            assert release.wait(10)
            return super().verify()

    world = World(tmp_path, SlowLog())
    first, second = world.client(ADMIN), world.client(AUDITOR)
    answers: list[int] = []
    thread = threading.Thread(target=lambda: answers.append(
        first.get("/api/audit/verify").status_code))
    thread.start()
    try:
        assert started.wait(10)
        busy = second.get("/audit/verify")
        assert busy.status_code == 429 and 'id="message"' in busy.text
        assert second.get("/api/audit/verify").json()["error"] == "busy"
    finally:
        release.set()
        thread.join(10)
    assert answers == [200]
    assert second.get("/api/audit/verify").status_code == 200  # free again


def test_operations_verify_audit_by_role(tmp_path: Path) -> None:
    audit = MemoryAuditLog()
    audit.append("queued", queue_id="Q1")
    audit.flush()
    ops = Operations(Queue(tmp_path / "spool"), audit)
    admin = Actor("alice", "admin", frozenset(), "192.0.2.1")
    auditor = Actor("audrey", "auditor", frozenset(), "192.0.2.2")
    user = Actor("taro", "user", frozenset({"taro@example.jp"}), "192.0.2.3")
    assert ops.verify_audit(admin).ok and ops.verify_audit(auditor).checked == 1
    with pytest.raises(Forbidden):
        ops.verify_audit(user)
    assert Operations(Queue(tmp_path / "spool2"), None).verify_audit(admin) is None
    audit.rows[0] = audit.rows[0].__class__(**{**audit.rows[0].__dict__, "event": "x"})
    assert ops.verify_audit(admin).first_bad_seq == 1


def test_without_an_audit_log_the_pages_say_so(tmp_path: Path) -> None:
    world = World(tmp_path, None)
    client = world.client(ADMIN)
    assert 'id="no-records"' in client.get("/audit").text
    assert "No audit log is configured" in client.get("/audit/verify").text
    assert client.get("/api/audit/verify").json()["error"] == "no_audit_log"
    queue_id = world.queue.enqueue(b"Subject: x\r\n\r\nx\r\n", Envelope(
        new_queue_id(), "a@outside.example", [RecipientState("taro@example.jp")], 1e9))
    assert 'id="no-records"' in client.get(f"/audit/{queue_id}").text
