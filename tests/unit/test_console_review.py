"""The review pages (mta/console/review_pages.py) over the real review operations, the real
memory review book and real signed tokens (the stand-in login and audit log of
tests/harness): a GET decides nothing, a POST needs the page's form token, and every bad
link (altered, another key, expired, used, another person's, for a decided review) gets a
clear page and a 4xx, never a traceback; the console's /reviews list and its decisions per
role; every decision is an audit record."""
from __future__ import annotations

import re
from typing import Iterator

import pytest
from starlette.testclient import TestClient

from milters.core.config import ConsoleSettings
from milters.core.review import MemoryReviewBook, ReviewRecord, issue, new_review
from mta.console.app import create_app
from mta.operations import Operations
from mta.operations.review import ReviewOperations
from mta.queue.spool import Queue
from tests.harness.console_login import ACCOUNTS, StandInLogin
from tests.harness.recording_audit import RecordingAudit

KEY = b"review-pages-test-key-0123456789abcdef"
OTHER_KEY = b"another-gateway-key-0123456789abcdefgh"
SESSION_KEY = b"review-pages-session-key-" * 2
NOW = 1_800_000_000.0
SENDER, OUTSIDE, BOSS = "taro@example.jp", "buyer@customer.example", "boss@example.jp"
HOSTILE = "<script>document.title='ran'</script>見積書"


class World:
    def __init__(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        self.book, self.audit = MemoryReviewBook(), RecordingAudit()
        self.now = NOW
        self.reviews = ReviewOperations(self.book, KEY, self.audit, clock=lambda: self.now)
        app = create_app(ConsoleSettings(), key=SESSION_KEY, authenticate=StandInLogin(),
                         operations=Operations(Queue(tmp_path / "spool"), self.audit))
        app.app.state.console.reviews = self.reviews  # type: ignore[attr-defined]
        self.app = app

    def review(self, kind: str = "delay", sender: str = SENDER, **extra: object
               ) -> ReviewRecord:
        return self.book.create(new_review(
            queue_id="Q" + str(len(self.audit.records)) + kind, kind=kind, sender=sender,
            recipients=[OUTSIDE], subject=HOSTILE, attachments=["請求書.pdf", "<b>x</b>.zip"],
            size=12345, now=self.now, timeout=3600, **extra))  # type: ignore[arg-type]

    def link(self, record: ReviewRecord, action: str, person: str = SENDER,
             key: bytes = KEY, expires: float | None = None) -> str:
        token = issue(key, record.id, person, action, NOW + 7200 if expires is None else expires)
        return f"/review/{token}"

    def anonymous(self, language: str = "en") -> TestClient:
        return TestClient(self.app, base_url="http://127.0.0.1",
                          headers={"accept-language": language})

    def login(self, name: str) -> tuple[TestClient, str]:
        client = TestClient(self.app, base_url="http://127.0.0.1")
        token = field(client.get("/login").text, "csrf_token")
        reply = client.post("/login", data={"csrf_token": token, "name": name,
                                            "password": ACCOUNTS[name][0]},
                            follow_redirects=False)
        assert reply.status_code == 303, reply.text
        return client, client.get("/api/me").json()["csrf_token"]


def field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


@pytest.fixture
def world(tmp_path) -> Iterator[World]:  # type: ignore[no-untyped-def]
    yield World(tmp_path)


def decided_events(world: World) -> list[tuple[str | None, str | None, str, str]]:
    return [(r.queue_id, r.actor, r.fields["action"], r.fields["reason"])
            for r in world.audit.records if r.event == "review_decided"]


# -- a link's confirmation page --------------------------------------------------------------
def test_a_get_shows_the_summary_escaped_and_decides_nothing(world: World) -> None:
    record = world.review()
    url = world.link(record, "cancel")
    client = world.anonymous()
    for _ in range(3):  # a mail scanner, a preview, the person: still pending
        page = client.get(url)
        assert page.status_code == 200, page.text
    assert world.book.get(record.id).state == "pending"  # type: ignore[union-attr]
    assert not world.book.token_used(record.id, "x" * 32)
    assert decided_events(world) == []
    html = page.text
    assert SENDER in html and OUTSIDE in html and "請求書.pdf" in html
    assert "<script>document.title" not in html and "&lt;script&gt;" in html
    assert "&lt;b&gt;x&lt;/b&gt;.zip" in html
    assert 'data-action="cancel"' in html and field(html, "form_token")
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_the_page_speaks_japanese_when_asked(world: World) -> None:
    page = world.anonymous("ja").get(world.link(world.review(), "send_now"))
    assert page.status_code == 200
    assert "今すぐ送信" in page.text and "送信メールの確認" in page.text


def test_a_post_with_the_form_token_decides_once_and_is_audited(world: World) -> None:
    record = world.review()
    url = world.link(record, "cancel")
    client = world.anonymous()
    token = field(client.get(url).text, "form_token")
    done = client.post(url, data={"form_token": token})
    assert done.status_code == 200, done.text
    assert 'data-state="cancelled"' in done.text
    assert world.book.get(record.id).state == "cancelled"  # type: ignore[union-attr]
    assert decided_events(world) == [(record.queue_id, f"review:{SENDER}", "cancel", "")]
    assert world.audit.records[-1].source == "testclient"
    # The same link again: refused, clearly, and nothing more is recorded.
    again = client.post(url, data={"form_token": token})
    assert again.status_code == 409 and 'data-reason="token_used"' in again.text
    reopened = client.get(url)  # says the link was used, not merely that it is decided
    assert reopened.status_code == 409 and 'data-reason="token_used"' in reopened.text
    assert len(decided_events(world)) == 1


def test_the_other_link_of_a_decided_review_is_refused(world: World) -> None:
    record = world.review()
    cancel, send_now = world.link(record, "cancel"), world.link(record, "send_now")
    client = world.anonymous()
    client.post(cancel, data={"form_token": field(client.get(cancel).text, "form_token")})
    page = client.get(send_now)
    assert page.status_code == 409 and 'data-reason="decided"' in page.text


def test_a_post_without_or_with_another_links_form_token_changes_nothing(
        world: World) -> None:
    record, other = world.review(), world.review()
    url = world.link(record, "cancel")
    foreign = field(world.anonymous().get(world.link(other, "cancel")).text, "form_token")
    client = world.anonymous()
    for data in ({}, {"form_token": ""}, {"form_token": foreign},
                 {"form_token": "0" * 64}, {"form_token": "é" * 64}):
        reply = client.post(url, data=data)
        assert reply.status_code == 403, (data, reply.text)
        assert 'data-reason="form"' in reply.text
    assert world.book.get(record.id).state == "pending"  # type: ignore[union-attr]
    assert decided_events(world) == []


def test_an_expired_link_gets_a_clear_page(world: World) -> None:
    record = world.review()
    url = world.link(record, "cancel", expires=NOW - 1)
    client = world.anonymous("ja")
    page = client.get(url)
    assert page.status_code == 410 and "有効期限" in page.text
    posted = client.post(url, data={"form_token": world.reviews.form_token(url[8:])})
    assert posted.status_code == 410
    # A link still in date for a review whose own deadline passed: expired too.
    world.now = record.deadline + 1
    late = world.link(record, "send_now")
    assert world.anonymous().get(late).status_code == 410
    assert world.book.get(record.id).state == "pending"  # type: ignore[union-attr]


@pytest.mark.parametrize("spoil", ["flip", "other_key", "truncate", "garbage", "huge",
                                   "unicode", "swap_action"])
def test_an_altered_or_foreign_link_is_refused_without_a_traceback(
        world: World, spoil: str) -> None:
    record = world.review()
    token = world.link(record, "cancel")[len("/review/"):]
    head, _, tail = token.partition(".")
    if spoil == "flip":
        token = ("A" if head[5] != "A" else "B").join((head[:5], head[6:])) + "." + tail
    elif spoil == "other_key":
        token = world.link(record, "cancel", key=OTHER_KEY)[len("/review/"):]
    elif spoil == "truncate":
        token = token[:-3]
    elif spoil == "garbage":
        token = "not-a-token"
    elif spoil == "huge":
        token = "A" * 5000 + "." + tail
    elif spoil == "unicode":
        token = "確認." + tail
    elif spoil == "swap_action":  # the send_now link's signature on the cancel payload
        other = world.link(record, "send_now")[len("/review/"):]
        token = head + "." + other.partition(".")[2]
    client = world.anonymous()
    page = client.get(f"/review/{token}")
    assert page.status_code == 400, page.text
    assert 'data-reason="' in page.text and "Traceback" not in page.text
    assert "not valid" in page.text
    posted = client.post(f"/review/{token}",
                         data={"form_token": world.reviews.form_token(token)})
    assert posted.status_code == 400
    assert world.book.get(record.id).state == "pending"  # type: ignore[union-attr]


def test_another_persons_link_cannot_decide(world: World) -> None:
    """A correctly signed link for someone who is not the sender (a cancel) or not an
    approver (an approve) is refused by the book: 403, nothing changes."""
    record = world.review()
    url = world.link(record, "cancel", person="mallory@example.jp")
    client = world.anonymous()
    page = client.get(url)  # shows nothing of the message
    assert page.status_code == 403 and SENDER not in page.text and "請求書" not in page.text
    reply = client.post(url, data={"form_token": world.reviews.form_token(url[8:])})
    assert reply.status_code == 403 and 'data-reason="wrong_person"' in reply.text
    approval = world.review("approve", approvers=[BOSS])
    stranger = world.link(approval, "approve", person="mallory@example.jp")
    reply = client.post(stranger, data={"form_token": world.reviews.form_token(
        stranger[len("/review/"):])})
    assert reply.status_code == 403
    for r in (record, approval):
        assert world.book.get(r.id).state == "pending"  # type: ignore[union-attr]
    assert decided_events(world) == []


def test_an_approvers_rejection_carries_the_reason_and_self_approval_is_refused(
        world: World) -> None:
    own_review = world.review("approve", approvers=[SENDER])
    own = world.link(own_review, "approve", person=SENDER)
    client = world.anonymous()
    refused = client.post(own, data={"form_token": field(client.get(own).text,
                                                         "form_token")})
    assert refused.status_code == 403 and 'data-reason="self_approval"' in refused.text
    approval = world.review("approve", approvers=[BOSS])
    reject = world.link(approval, "reject", person=BOSS)
    page = client.get(reject)
    assert 'name="reason"' in page.text
    done = client.post(reject, data={"form_token": field(page.text, "form_token"),
                                     "reason": "宛先が違います\r\n<b>"})
    assert done.status_code == 200 and 'data-state="rejected"' in done.text
    record = world.book.get(approval.id)
    assert record is not None and record.decisions[-1].reason.startswith("宛先が違います")
    assert decided_events(world) == [(approval.queue_id, f"review:{BOSS}", "reject",
                                      "宛先が違います\r\n<b>")]


def test_a_broken_book_gives_a_page_not_a_traceback(world: World) -> None:
    record = world.review()
    url = world.link(record, "cancel")

    def down(review_id: str) -> None:
        raise OSError("disk on fire")
    world.book._load = down  # type: ignore[method-assign]
    page = world.anonymous().get(url)
    assert page.status_code == 503 and "Traceback" not in page.text


def test_an_oversized_form_is_refused(world: World) -> None:
    url = world.link(world.review(), "cancel")
    reply = world.anonymous().post(url, content=b"reason=" + b"x" * 100_000,
                                   headers={"content-type":
                                            "application/x-www-form-urlencoded"})
    assert reply.status_code == 413


# -- the console's list and decisions (a login) ------------------------------------------------
def test_the_list_shows_each_person_their_own_and_admins_everything(world: World) -> None:
    mine = world.review()
    to_approve = world.review("approve", sender="hanako@example.jp", approvers=[SENDER])
    others = world.review(sender="hanako@example.jp")
    user, _ = world.login(SENDER)
    html = user.get("/reviews").text
    assert f'data-review-id="{mine.id}"' in html and f'data-review-id="{to_approve.id}"' in html
    assert f'data-review-id="{others.id}"' not in html
    admin, _ = world.login("alice")
    html = admin.get("/reviews").text
    for record in (mine, to_approve, others):
        assert f'data-review-id="{record.id}"' in html
    auditor, _ = world.login("audrey")
    html = auditor.get("/reviews").text
    assert f'data-review-id="{others.id}"' in html and 'name="action"' not in html
    assert world.anonymous().get("/reviews", follow_redirects=False).status_code == 303


def test_console_decisions_by_role(world: World) -> None:
    mine, others = world.review(), world.review(sender="hanako@example.jp")
    user, csrf = world.login(SENDER)
    # Without the session's CSRF token: refused, nothing changes.
    assert user.post(f"/reviews/{mine.id}/decide",
                     data={"action": "cancel"}).status_code == 403
    # Another's review, or a guessed ID: not found (IDs cannot be probed).
    for review_id in (others.id, "0" * 32, "../../etc"):
        reply = user.post(f"/reviews/{review_id}/decide",
                          data={"csrf_token": csrf, "action": "cancel"})
        assert reply.status_code == 404, review_id
    auditor, audit_csrf = world.login("audrey")
    assert auditor.post(f"/reviews/{mine.id}/decide",
                        data={"csrf_token": audit_csrf, "action": "cancel"}).status_code == 403
    assert world.book.get(mine.id).state == "pending"  # type: ignore[union-attr]
    done = user.post(f"/reviews/{mine.id}/decide",
                     data={"csrf_token": csrf, "action": "send_now"}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/reviews?done=sent"
    admin, admin_csrf = world.login("alice")
    done = admin.post(f"/reviews/{others.id}/decide",
                      data={"csrf_token": admin_csrf, "action": "cancel"},
                      follow_redirects=False)
    assert done.status_code == 303
    assert world.book.get(others.id).state == "cancelled"  # type: ignore[union-attr]
    assert decided_events(world) == [(mine.queue_id, f"console:{SENDER}", "send_now", ""),
                                     (others.queue_id, "console:alice", "cancel", "")]
    # Decided already: a clear 409.
    again = admin.post(f"/reviews/{others.id}/decide",
                       data={"csrf_token": admin_csrf, "action": "cancel"})
    assert again.status_code == 409
