"""The held-mail pages and their JSON API over the real Operations and a real spool (the
stand-in login and audit log of tests/harness): what each role sees and may do, guessed
IDs, forged and oversized requests, hostile messages, POST/redirect/GET."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest
from starlette.testclient import TestClient

from milters.core.config import ConsoleSettings
from mta.console.app import create_app
from mta.console.security import CSP
from mta.operations import Operations
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.console_login import ACCOUNTS, StandInLogin
from tests.harness.recording_audit import RecordingAudit

KEY = b"held-pages-test-key-" * 3
JAPANESE = "=?ISO-2022-JP?B?GyRCSl1OMSVhITwlaxsoQg==?="  # 保留メール
HOSTILE = b"""From: <script>document.title='from ran'</script>@outside.example\r
Subject: <script>document.title='subject ran'</script> <img src=x onerror=alert(1)>\r
Message-ID: <hostile@outside.example>\r
MIME-Version: 1.0\r
Content-Type: multipart/mixed; boundary="b"\r
\r
--b\r
Content-Type: text/html; charset=utf-8\r
\r
<p>hi <a href="javascript:alert('link')">click</a><script>alert('body')</script>\r
<img src=x onerror="alert('img')"></p>\r
--b\r
Content-Type: application/octet-stream\r
Content-Disposition: attachment; filename="<img src=x onerror=alert(1)>.exe"\r
\r
MZ\r
--b--\r
"""


def held(queue: Queue, sender: str, recipients: list[str], subject: str = "hello",
         reason: str = "DMARC: quarantine", raw: bytes | None = None) -> str:
    raw = raw or (f"From: {sender}\r\nSubject: {subject}\r\nMessage-ID: <{new_queue_id()}@x>"
                  "\r\n\r\nbody text\r\n").encode()
    return queue.enqueue(raw, Envelope(new_queue_id(), sender,
                                       [RecipientState(r) for r in recipients],
                                       1_795_900_000.0, hold_reason=reason))


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.queue, self.audit = Queue(tmp_path / "spool"), RecordingAudit()
        self.ops = Operations(self.queue, self.audit)
        self.app = create_app(ConsoleSettings(), key=KEY, authenticate=StandInLogin(),
                              operations=self.ops)

    def client(self, name: str) -> tuple[TestClient, str]:
        """A logged-in client and its session's CSRF token."""
        client = TestClient(self.app, base_url="http://127.0.0.1")
        token = form_token(client.get("/login").text)
        reply = client.post("/login", data={"csrf_token": token, "name": name,
                                            "password": ACCOUNTS[name][0]},
                            follow_redirects=False)
        assert reply.status_code == 303, reply.text
        return client, client.get("/api/me").json()["csrf_token"]


def form_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield World(tmp_path)


ADMIN, AUDITOR, USER = "alice", "audrey", "taro@example.jp"


# -- the list ------------------------------------------------------------------------------
def test_the_list_decodes_japanese_subjects_and_the_search_box_finds_them(world: World) -> None:
    mine = held(world.queue, "x@outside.example", ["taro@example.jp"], JAPANESE)
    other = held(world.queue, "y@outside.example", ["hanako@example.jp"], "Invoice",
                 reason="held by the administrator")
    client, _ = world.client(ADMIN)
    page = client.get("/held")
    assert page.status_code == 200 and "保留メール" in page.text
    assert f'href="/held/{mine}"' in page.text and f'href="/held/{other}"' in page.text
    found = client.get("/held", params={"q": "保留"}).text
    assert mine in found and other not in found
    by_reason = client.get("/held", params={"reason": "held by the administrator"}).text
    assert other in by_reason and mine not in by_reason
    # Bulk checkboxes and the static select-all script for an admin.
    assert 'id="select-all"' in page.text and 'src="/static/held.js"' in page.text
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["cache-control"] == "no-store"


def test_pages_of_fifty(world: World) -> None:
    ids = [held(world.queue, "x@outside.example", ["a@example.jp"], f"n{i}") for i in range(53)]
    client, _ = world.client(ADMIN)
    first = client.get("/held").text
    assert 'id="next"' in first and 'id="prev"' not in first
    assert "53 held messages; 1-50 shown." in first
    second = client.get("/held", params={"offset": "50"}).text
    assert sum(i in second for i in ids) == 3 and 'id="prev"' in second
    assert client.get("/held", params={"offset": "junk"}).status_code == 200
    api = client.get("/api/held", params={"offset": "50", "limit": "10"}).json()
    assert api["total"] == 53 and len(api["items"]) == 3
    assert client.get("/api/held", params={"limit": "-1"}).status_code == 400


def test_a_user_sees_only_their_own_mail_and_guessed_ids_are_404(world: World) -> None:
    mine = held(world.queue, "x@outside.example", ["Taro@Example.jp"], "for taro")
    theirs = held(world.queue, "x@outside.example", ["hanako@example.jp"], "for hanako")
    client, token = world.client(USER)
    listing = client.get("/held").text
    assert mine in listing and theirs not in listing and "for hanako" not in listing
    assert 'id="select-all"' not in listing and 'id="bulk-release"' not in listing
    assert client.get(f"/held/{mine}").status_code == 200
    missing = new_queue_id()
    pages = [client.get(f"/held/{q}") for q in (theirs, missing)]
    assert [p.status_code for p in pages] == [404, 404]
    apis = [client.get(f"/api/held/{q}") for q in (theirs, missing)]
    assert [a.status_code for a in apis] == [404, 404]
    # Nothing tells "not yours" from "not there" but the ID it names.
    assert apis[0].json()["message"].replace(theirs, "ID") == \
        apis[1].json()["message"].replace(missing, "ID")
    assert client.get(f"/api/held/{theirs}/original").status_code == 404
    assert client.get("/api/held", params={"q": "hanako"}).json()["total"] == 0
    # Their own message: readable, but not theirs to release (a security hold).
    refused = client.post(f"/api/held/{mine}/release", headers={"x-csrf-token": token})
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert world.queue.envelope(mine).hold_reason is not None


def test_an_auditor_sees_no_buttons_and_a_crafted_post_is_refused(world: World) -> None:
    queue_id = held(world.queue, "x@outside.example", ["a@example.jp", "b@example.jp"])
    client, token = world.client(AUDITOR)
    page = client.get(f"/held/{queue_id}")
    assert page.status_code == 200 and "body text" in page.text
    for button in ('id="release"', 'id="delete"', 'id="download"', 'id="release-some"'):
        assert button not in page.text
    assert 'id="select-all"' not in client.get("/held").text
    # The same POSTs an admin's buttons send, with the auditor's own valid token.
    for path, data in ((f"/held/{queue_id}/release", {"mode": "all"}),
                       (f"/held/{queue_id}/delete", {}),
                       ("/held/bulk", {"action": "release", "ids": queue_id})):
        reply = client.post(path, data={"csrf_token": token, **data}, follow_redirects=False)
        assert reply.status_code == 403 and "Your role may not do this." in reply.text
    for path, body in ((f"/api/held/{queue_id}/release", {}),
                       (f"/api/held/{queue_id}/delete", {}),
                       ("/api/bulk", {"action": "delete", "ids": [queue_id]})):
        reply = client.post(path, json=body, headers={"x-csrf-token": token})
        assert reply.status_code == 403 and reply.json()["error"] == "forbidden"
    assert client.get(f"/api/held/{queue_id}/original").status_code == 403
    assert world.queue.envelope(queue_id).hold_reason is not None
    assert world.audit.records == []


# -- actions -------------------------------------------------------------------------------
def test_release_needs_the_token_then_redirects_and_is_audited(world: World) -> None:
    queue_id = held(world.queue, "x@outside.example", ["a@example.jp"])
    client, token = world.client(ADMIN)
    page = client.get(f"/held/{queue_id}").text
    assert 'id="release"' in page and 'id="delete"' in page and 'id="download"' in page
    assert form_token(page) == token
    for forged in ({}, {"csrf_token": "x" * 43}):
        reply = client.post(f"/held/{queue_id}/release", data=forged, follow_redirects=False)
        assert reply.status_code == 403
    assert world.queue.envelope(queue_id).hold_reason is not None
    done = client.post(f"/held/{queue_id}/release", data={"csrf_token": token, "mode": "all"},
                       follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/held?done=released"
    assert world.queue.envelope(queue_id).hold_reason is None
    assert "Released: the message is on its way." in client.get(done.headers["location"]).text
    [record] = world.audit.records
    assert (record.event, record.actor, record.source) == \
        ("released", "console:alice", "testclient")
    again = client.post(f"/held/{queue_id}/release", data={"csrf_token": token},
                        follow_redirects=False)
    assert again.status_code == 400 and "is not on hold" in again.text


def test_release_to_chosen_recipients_keeps_the_rest_held(world: World) -> None:
    queue_id = held(world.queue, "x@outside.example",
                    ["a@example.jp", "b@example.jp", "c@example.jp"])
    client, token = world.client(ADMIN)
    page = client.get(f"/held/{queue_id}").text
    assert page.count('name="rcpt"') == 3
    none_chosen = client.post(f"/held/{queue_id}/release",
                              data={"csrf_token": token, "mode": "some"})
    assert none_chosen.status_code == 400
    done = client.post(f"/held/{queue_id}/release", follow_redirects=False,
                       content="csrf_token=" + token + "&mode=some&rcpt=b%40example.jp"
                               "&rcpt=C%40example.jp",
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert done.status_code == 303
    assert done.headers["location"] == f"/held/{queue_id}?done=released_partly"
    rest = world.queue.envelope(queue_id)
    assert rest.hold_reason is not None and [r.address for r in rest.pending()] == \
        ["a@example.jp"]
    [record] = world.audit.records
    released = world.queue.envelope(record.fields["new_queue_id"])
    assert released.hold_reason is None
    assert sorted(r.address for r in released.pending()) == ["b@example.jp", "c@example.jp"]
    # Through the API: a recipient the message lacks is a clear 400.
    wrong = client.post(f"/api/held/{queue_id}/release", json={"recipients": ["z@example.jp"]},
                        headers={"x-csrf-token": token})
    assert wrong.status_code == 400 and "no held recipient z@example.jp" in wrong.json()["message"]


def test_bulk_release_of_two_and_an_api_bulk_with_a_bad_id(world: World) -> None:
    one, two, three = (held(world.queue, "x@outside.example", ["a@example.jp"])
                       for _ in range(3))
    client, token = world.client(ADMIN)
    done = client.post("/held/bulk", follow_redirects=False,
                       content=f"csrf_token={token}&action=release&ids={one}&ids={two}",
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert done.status_code == 303 and done.headers["location"] == "/held?done=bulk&ok=2&failed=0"
    assert "2 done, 0 failed." in client.get(done.headers["location"]).text
    assert [world.queue.envelope(q).hold_reason for q in (one, two)] == [None, None]
    bogus = new_queue_id()
    reply = client.post("/api/bulk", json={"action": "delete", "ids": [three, bogus, "../x"]},
                        headers={"x-csrf-token": token})
    assert reply.status_code == 200
    results = reply.json()["results"]
    assert [(r["queue_id"], r["ok"]) for r in results] == \
        [(three, True), (bogus, False), ("../x", False)]
    assert results[2]["detail"] == "no queued message (not a queue ID)"
    assert client.post("/held/bulk", data={"csrf_token": token, "action": "release"}
                       ).status_code == 400  # nothing selected


def test_delete_and_download_the_original(world: World) -> None:
    queue_id = held(world.queue, "x@outside.example", ["a@example.jp"], "to go")
    client, token = world.client(ADMIN)
    original = client.get(f"/api/held/{queue_id}/original")
    assert original.status_code == 200 and original.headers["content-type"] == "message/rfc822"
    assert original.headers["content-disposition"] == f'attachment; filename="{queue_id}.eml"'
    assert original.content == world.queue.message(queue_id)
    done = client.post(f"/held/{queue_id}/delete", data={"csrf_token": token},
                       follow_redirects=False)
    assert done.headers["location"] == "/held?done=deleted"
    assert client.get(f"/held/{queue_id}").status_code == 404
    assert [r.event for r in world.audit.records] == ["downloaded", "removed"]


# -- bad input -----------------------------------------------------------------------------
def test_bad_api_input_gets_a_json_error_never_a_traceback(world: World) -> None:
    queue_id = held(world.queue, "x@outside.example", ["a@example.jp"])
    client, token = world.client(ADMIN)
    csrf = {"x-csrf-token": token}
    cases = [
        (f"/api/held/{queue_id}/release", {"content": b"{not json"}, 400, "bad_json"),
        (f"/api/held/{queue_id}/release", {"json": ["a"]}, 400, "bad_request"),
        (f"/api/held/{queue_id}/release", {"json": {"recipients": "a@example.jp"}}, 400,
         "bad_request"),
        (f"/api/held/{queue_id}/release", {"json": {"recipients": [1, 2]}}, 400, "bad_request"),
        (f"/api/held/{queue_id}/release", {"json": {"recipients": []}}, 400, "bad_request"),
        (f"/api/held/{queue_id}/release", {"content": b"[" * 50_000}, 400, "bad_json"),
        (f"/api/held/{queue_id}/release", {"content": b"x" * 70_000}, 413, "too_large"),
        ("/api/bulk", {"json": {"action": "release", "ids": [new_queue_id()] * 10_000}}, 413,
         "too_large"),
        ("/api/bulk", {"json": {"action": "release", "ids": [str(i) for i in range(1001)]}},
         400, "bad_request"),
        ("/api/bulk", {"json": {"action": "launch", "ids": [queue_id]}}, 400, "bad_request"),
        ("/api/bulk", {"json": {"action": "release", "ids": queue_id}}, 400, "bad_request"),
        ("/api/bulk", {"json": {"action": "release", "ids": []}}, 400, "bad_request"),
    ]
    for path, body, status, code in cases:
        reply = client.post(path, headers=csrf, **body)  # type: ignore[arg-type]
        assert (reply.status_code, reply.json()["error"]) == (status, code), (path, reply.text)
    # A body that claims to be huge is refused before it is read.
    claimed = client.post("/api/bulk", headers={**csrf, "content-length": "999999999"},
                          content=b"{}")
    assert claimed.status_code == 413
    assert world.queue.envelope(queue_id).hold_reason is not None
    # Without a session: 401; with a session but no token: 403, nothing done.
    assert TestClient(world.app).get("/api/held").status_code == 401
    assert client.post(f"/api/held/{queue_id}/delete").json()["error"] == "csrf"
    assert client.get("/api/held/%00%0a/original").status_code == 404


def test_a_form_flood_is_refused_without_acting(world: World) -> None:
    queue_id = held(world.queue, "x@outside.example", ["a@example.jp"])
    client, token = world.client(ADMIN)
    many = f"csrf_token={token}&action=delete&ids={queue_id}" + "&ids=x" * 2000
    reply = client.post("/held/bulk", content=many,
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 413 and "too large" in reply.text
    huge = client.post("/held/bulk", content=f"csrf_token={token}&q=" + "a" * 100_000,
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert huge.status_code == 413
    assert world.queue.envelope(queue_id).hold_reason is not None


# -- hostile messages ----------------------------------------------------------------------
def test_markup_in_a_message_is_shown_as_text(world: World) -> None:
    queue_id = held(world.queue, "x@outside.example", ["a@example.jp"], raw=HOSTILE)
    world.audit.append("received", queue_id=queue_id, actor="mailmoat/smtpd",
                       note="<script>alert('audit')</script>")
    client, _ = world.client(ADMIN)
    for page in (client.get("/held").text, client.get(f"/held/{queue_id}").text):
        assert "&lt;script&gt;document.title=&#39;subject ran&#39;&lt;/script&gt;" in page
        scripts = re.findall(r"<script[^>]*>", page)
        assert scripts == ['<script src="/static/console.js" defer>'] + (
            ['<script src="/static/held.js" defer>'] if 'id="held"' in page else [])
        tags = re.findall(r"<[a-zA-Z][^>]*>", page)  # the markup the browser builds
        assert not [tag for tag in tags if re.search(r"(?i)<img|\bon[a-z]+=|javascript:", tag)]
    shown = client.get(f"/held/{queue_id}").text
    assert "&lt;img src=x onerror=alert(1)&gt;.exe" in shown  # the file name, as text
    view = client.get(f"/api/held/{queue_id}").json()
    assert view["attachments"][0]["name"] == "<img src=x onerror=alert(1)>.exe"
    assert view["story"][0]["fields"] == {"note": "<script>alert('audit')</script>"}
    assert "&lt;script&gt;alert(&#39;audit&#39;)&lt;/script&gt;" in shown


def test_the_message_page_shows_parts_attachments_results_and_story(world: World) -> None:
    raw = ("From: x@outside.example\r\nTo: a@example.jp\r\nSubject: " + JAPANESE + "\r\n"
           "Authentication-Results: mx.test; dmarc=fail header.from=quar.test\r\n"
           "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
           "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n本文です\r\n"
           "--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
           "filename*=UTF-8''%E8%A6%8B%E7%A9%8D.pdf\r\n\r\nJVBER\r\n--b--\r\n").encode()
    queue_id = held(world.queue, "x@outside.example", ["a@example.jp"], raw=raw)
    world.audit.append("milter_verdict", queue_id=queue_id, actor="mailmoat/auth",
                       milter="auth", action="quarantine", reason="DMARC fail")
    client, _ = world.client(ADMIN)
    page = client.get(f"/held/{queue_id}").text
    assert "<h1 id=\"heading\">保留メール</h1>" in page and "本文です" in page
    assert "見積.pdf" in page and "application/pdf" in page
    assert "dmarc=fail header.from=quar.test" in page
    assert "milter_verdict" in page and "mailmoat/auth" in page
    assert "auth: DMARC fail" in page  # why held, from the story
    assert 'name="rcpt"' not in page  # one recipient: no choice to make
    json_view = client.get(f"/api/held/{queue_id}").json()
    assert json_view["subject"] == "保留メール" and json_view["held"] is True
    assert json.dumps(json_view)  # plain JSON all through
