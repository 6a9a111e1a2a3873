"""The digest lists and their mail: per person, capped, with fresh signed links that the
console accepts, in Japanese and English, and nothing a hostile message carries able to add
a header or show one recipient another's address."""
from __future__ import annotations

import email
import re
from datetime import timedelta, timezone
from email.header import decode_header

import pytest

from milters.core.jis import decode_cp50220
from milters.core.review import issue, link, new_review, verify
from milters.core.review.digest import Digest, DigestBuilder, DigestRenderer
from milters.core.review.record import ReviewRecord

T0 = 1_700_000_000.0
JST = timezone(timedelta(hours=9))
KEY = b"k" * 32
CONSOLE = "https://mail.example.jp:8026"
RENDERER = DigestRenderer("mailmoat-review@example.jp", "mx.example.jp", tz=JST)
SENDER, BOSS = "taro@example.jp", "boss@example.jp"
OUR_HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted",
               "X-Mailmoat-Notice", "MIME-Version", "Content-Type", "Content-Transfer-Encoding"]


def review(kind: str = "delay", **over: object) -> ReviewRecord:
    values: dict[str, object] = dict(
        queue_id="4F2A1", kind=kind, sender=SENDER, recipients=["x@partner.example"],
        subject="見積書の送付", attachments=["見積書.pdf"], size=1000, now=T0, timeout=300.0)
    if kind == "approve":
        values.update(approvers=[BOSS], timeout=3600.0)
    values.update(over)
    return new_review(**values)  # type: ignore[arg-type]


def builder(**over: object) -> DigestBuilder:
    values: dict[str, object] = dict(
        domains=("example.jp",), max_items=200,
        issue_link=lambda rid, person, action, expires: link(
            CONSOLE, issue(KEY, rid, person, action, expires)),
        held_link=lambda queue_id: f"{CONSOLE}/held/{queue_id}")
    values.update(over)
    return DigestBuilder(**values)  # type: ignore[arg-type]


def by_person(digests: list[Digest]) -> dict[str, Digest]:
    return {d.person: d for d in digests}


def read(raw: bytes) -> tuple[email.message.Message, str, str]:
    assert raw.isascii() and not re.search(rb"[^\r]\n|\r[^\n]", raw)
    message = email.message_from_bytes(raw)
    subject = "".join(p.decode(c or "ascii") if isinstance(p, bytes) else p
                      for p, c in decode_header(message["Subject"]))
    payload = message.get_payload(decode=True)
    charset = message.get_content_charset()
    body = decode_cp50220(payload) if charset == "iso-2022-jp" else payload.decode(charset)
    return message, subject, body


def links_in(body: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for url in re.findall(rf"<({re.escape(CONSOLE)}/review/[^>]+)>", body):
        claims = verify(KEY, url.rsplit("/", 1)[1], now=T0)
        found.setdefault(claims.action, []).append(claims.person)
    return found


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_each_list_carries_the_links_its_kind_allows_signed_for_that_person(lang: str) -> None:
    build = builder(language=lang)
    for kind in ("delay", "confirm", "approve"):
        build.add_review(review(kind, subject=f"subject-{kind}"))
    people = by_person(build.digests(lambda qid: ""))
    assert sorted(people) == [BOSS, SENDER]
    message, subject, body = read(RENDERER.render(people[SENDER], T0))
    assert message["To"] == SENDER and message["Auto-Submitted"] == "auto-generated"
    assert "3" in subject
    # delay: send now + cancel; confirm: confirm + cancel; approve: cancel; all the sender's
    assert links_in(body) == {"send_now": [SENDER], "confirm": [SENDER],
                              "cancel": [SENDER] * 3}
    assert all(f"subject-{kind}" in body for kind in ("delay", "confirm", "approve"))
    message, _, body = read(RENDERER.render(people[BOSS], T0))
    assert links_in(body) == {"approve": [BOSS], "reject": [BOSS]}
    assert SENDER in body and "subject-approve" in body and "subject-delay" not in body
    if lang == "ja":
        assert message.get_content_charset() == "iso-2022-jp"
        assert "承認を待っている" in body and "見積書.pdf" in body
    else:
        assert "Approvals waiting for your decision (1)" in body


def test_a_link_expires_with_its_review_and_is_refused_after_it() -> None:
    build = builder()
    record = review("delay")
    build.add_review(record)
    _, _, body = read(RENDERER.render(build.digests(lambda qid: "")[0], T0))
    token = re.search(r"/review/([^>]+)>", body).group(1)
    assert verify(KEY, token, now=record.deadline - 1).review_id == record.id
    with pytest.raises(Exception):
        verify(KEY, token, now=record.deadline + 1)


def test_a_hostile_subject_stays_body_text_and_adds_no_header() -> None:
    hostile = "hi\r\nBcc: evil@attacker.example\r\n\r\n=?UTF-8?B?SGVsbG8=?= <script>"
    build = builder(language="en")
    build.add_review(review("delay", subject=hostile))
    build.add_held("Q1", "x@example.jp", ["taro@example.jp"], T0, "dmarc\r\nBcc: x@y")
    for digest in build.digests(lambda qid: hostile):
        raw = RENDERER.render(digest, T0)
        message, subject, body = read(raw)
        assert list(message.keys()) == OUR_HEADERS
        assert message["Bcc"] is None and b"attacker" not in raw.split(b"\r\n\r\n")[0]
        assert "evil@attacker.example" in body  # shown, as text on the subject's line
        line = next(l for l in body.splitlines() if "evil@attacker" in l)
        assert line.startswith("[1] hi Bcc: evil@attacker.example")
        assert "=?UTF-8?B?SGVsbG8=?=" in line  # an encoded word in a subject stays as typed
        assert not re.search(r"^Bcc:", body, re.M)
        assert subject.startswith("Mail digest")


def test_ten_thousand_held_messages_make_a_capped_digest_reading_only_the_shown() -> None:
    build = builder(language="ja")
    for n in range(10_000):
        build.add_held(f"Q{n:05d}", "spam@outside.example", [SENDER], T0 + n, "dmarc quarantine")
    read_subjects: list[str] = []

    def subject_of(queue_id: str) -> str:
        read_subjects.append(queue_id)
        return f"件名 {queue_id}"

    [digest] = build.digests(subject_of)
    assert len(digest.held) == 200 and digest.more_held == 9_800 and digest.counts[2] == 10_000
    assert len(read_subjects) == 200
    raw = RENDERER.render(digest, T0)
    assert len(raw) < 200_000
    _, subject, body = read(raw)
    assert "10000" in subject and "他 9800 件" in body
    assert body.count(f"{CONSOLE}/held/") == 200


def test_a_recipient_sees_only_their_own_address_and_a_forged_outside_sender_gets_none(
        ) -> None:
    build = builder(language="en")
    build.add_held("Q1", "forged@outside.example",
                   ["a@example.jp", "b@example.jp", "c@elsewhere.example"], T0, "dmarc")
    people = by_person(build.digests(lambda qid: "Invoice"))
    assert sorted(people) == ["a@example.jp", "b@example.jp"]  # not the outside ones
    _, _, body = read(RENDERER.render(people["a@example.jp"], T0))
    assert "a@example.jp" in body and "b@example.jp" not in body
    assert "c@elsewhere.example" not in body
    assert f"{CONSOLE}/held/Q1" in body and "administrator" in body
    # Their own sender sees all recipients of the message.
    build = builder(language="en")
    build.add_held("Q2", "a@example.jp", ["b@example.jp", "c@elsewhere.example"], T0, "x")
    people = by_person(build.digests(lambda qid: "s"))
    _, _, body = read(RENDERER.render(people["a@example.jp"], T0))
    assert "b@example.jp, c@elsewhere.example" in body


def test_audiences_only_and_self_approval() -> None:
    record = review("approve", approvers=[SENDER, BOSS])  # the sender first: not theirs
    build = builder(audiences=("approvers",))
    build.add_review(record)
    build.add_held("Q1", "x@example.jp", ["y@example.jp"], T0, "dmarc")
    assert by_person(build.digests(lambda qid: "")) == {}  # step 0 is the sender: no one
    build = builder(audiences=("approvers",))
    build.add_review(review("approve", approvers=[BOSS]))
    build.add_review(review("delay"))
    assert sorted(by_person(build.digests(lambda qid: ""))) == [BOSS]
    build = builder(only="Y@example.jp")
    build.add_review(review("approve"))
    build.add_held("Q1", "x@example.jp", ["y@example.jp"], T0, "dmarc")
    [digest] = build.digests(lambda qid: "")
    assert digest.person == "y@example.jp" and digest.counts == (0, 0, 1)


def test_the_language_follows_the_persons_review_notices_unless_set() -> None:
    build = builder()
    build.add_review(review("delay", language="en"))
    build.add_held("Q1", "x@outside.example", ["y@example.jp"], T0, "dmarc")
    people = by_person(build.digests(lambda qid: ""))
    assert people[SENDER].language == "en" and people["y@example.jp"].language == "ja"
    build = builder(language="ja")
    build.add_review(review("delay", language="en"))
    assert build.digests(lambda qid: "")[0].language == "ja"
