"""The review notices as a mail client reads them: complete RFC 5322 messages (Date,
Message-ID, From, Auto-Submitted), Japanese in ISO-2022-JP (CP50220) or UTF-8, every
value the kind needs, and no subject or file name able to break or add a header."""
from __future__ import annotations

import base64
import email
import re
from datetime import timedelta, timezone
from email.header import decode_header
from email.message import Message
from pathlib import Path

import pytest

from milters.core.errors import ReviewError
from milters.core.jis import decode_cp50220
from milters.core.review import ReviewNotices, new_review
from milters.core.review.notices import KINDS, LANGUAGES, TemplateError, load_template
from milters.core.review.record import ReviewRecord, decided, escalated

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC = 11-15 07:13 in Japan
JST = timezone(timedelta(hours=9))
NOTICES = ReviewNotices("mailmoat-review@example.jp", "mx.example.jp", tz=JST)
LINKS = {action: f"https://mail.example.jp:8026/review/{action.upper()}TOKEN"
         for action in ("send_now", "cancel", "confirm", "approve", "reject")}
EXPECTED_HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted",
                    "X-Mailmoat-Notice", "MIME-Version", "Content-Type",
                    "Content-Transfer-Encoding"]


def review(kind: str = "delay", **over: object) -> ReviewRecord:
    values: dict[str, object] = dict(
        queue_id="4F2A1", kind=kind, sender="taro@example.jp",
        recipients=["x@partner.example", "y@other.example", "z@example.jp"],
        outside=["x@partner.example", "y@other.example"], subject="① 見積書の送付（髙橋）",
        attachments=["見積書.pdf", "図面.zip"], size=123_000, now=T0, timeout=300.0)
    if kind == "approve":
        values.update(approvers=["boss@example.jp"], timeout=3600.0)
    values.update(over)
    return new_review(**values)  # type: ignore[arg-type]


def read(raw: bytes) -> tuple[Message, str, str]:
    """(message, decoded Subject, decoded body), checking the wire form on the way."""
    assert raw.isascii() and b"\r\n\r\n" in raw
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert not re.search(rb"[^\r]\n|\r[^\n]", raw)  # CRLF only
    message = email.message_from_bytes(raw)
    subject = "".join(_decode(part, charset) for part, charset
                      in decode_header(message["Subject"]))
    payload = message.get_payload(decode=True)
    charset = message.get_content_charset()
    body = decode_cp50220(payload) if charset == "iso-2022-jp" else payload.decode(charset)
    return message, subject, body


def _decode(part: bytes | str, charset: str | None) -> str:
    if isinstance(part, str):
        return part
    if charset == "iso-2022-jp":
        return decode_cp50220(part)
    return part.decode(charset or "ascii")


def test_the_delay_notice_names_what_is_held_until_when_and_both_links() -> None:
    message, subject, body = read(NOTICES.render_for_sender(review(), LINKS, "ja"))
    assert list(message.keys()) == EXPECTED_HEADERS
    assert message["From"] == "mailmoat-review@example.jp" and message["To"] == \
        "taro@example.jp"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Message-ID"].endswith("@mx.example.jp>") and email.utils.parsedate_to_datetime(
        message["Date"])
    assert message.get_content_charset() == "iso-2022-jp"
    assert subject == "【送信保留】① 見積書の送付（髙橋）"
    for text in ("x@partner.example", "y@other.example", "z@example.jp", "見積書.pdf",
                 "図面.zip", "07:18", LINKS["send_now"], LINKS["cancel"]):
        assert text in body, text
    assert LINKS["approve"] not in body


def test_the_confirm_notice_lists_the_outside_recipients_and_its_links() -> None:
    _, subject, body = read(NOTICES.render_for_sender(review("confirm"), LINKS, "ja"))
    assert subject.startswith("【送信確認】")
    assert "x@partner.example" in body and "y@other.example" in body
    assert "z@example.jp" not in body  # internal: not what is asked about
    assert LINKS["confirm"] in body and LINKS["cancel"] in body


def test_the_approvers_notice_has_the_summary_and_approve_reject_links() -> None:
    record = review("approve", message_id="<orig.1@example.jp>")
    message, subject, body = read(NOTICES.render_for_approver(record, "boss@example.jp",
                                                             LINKS, "en"))
    assert message["To"] == "boss@example.jp" and subject.startswith("Approval requested:")
    assert message["In-Reply-To"] == "<orig.1@example.jp>"
    for text in ("taro@example.jp", "x@partner.example", "見積書.pdf", "121 KB",
                 LINKS["approve"], LINKS["reject"]):
        assert text in body, text
    _, _, waiting = read(NOTICES.render_for_sender(record, LINKS, "en"))
    assert "boss@example.jp" in waiting and LINKS["cancel"] in waiting
    assert LINKS["approve"] not in waiting


def test_the_result_notices_say_why_the_message_did_not_go() -> None:
    record = review("approve")
    rejected = decided(record, "boss@example.jp", "s", "reject", "社外秘の資料です。\n削除して再送",
                       T0 + 5)
    _, subject, body = read(NOTICES.render_result(rejected, "ja"))
    assert subject.startswith("【送信却下】") and "社外秘の資料です。" in body
    assert "削除して再送" in body and "boss@example.jp" in body
    cancelled = decided(review(), "taro@example.jp", "s", "cancel", "", T0 + 5)
    _, subject, body = read(NOTICES.render_result(cancelled, "en"))
    assert subject.startswith("Cancelled, not sent:") and "x@partner.example" in body
    expired = decided(review("confirm"), "timer", "timer", "timeout", "", T0 + 300)
    _, subject, _ = read(NOTICES.render_result(expired))  # the record's own language: ja
    assert subject.startswith("【期限切れ】")
    with pytest.raises(ReviewError, match="no result notice"):
        NOTICES.render_result(record)


def test_an_escalated_approval_names_its_new_approver() -> None:
    record = escalated(review("approve", approvers=["boss@example.jp", "cio@example.jp"],
                              on_timeout="escalate"), T0 + 3600)
    _, _, body = read(NOTICES.render_for_sender(record, LINKS, "en"))
    assert "cio@example.jp" in body


@pytest.mark.parametrize("hostile", [
    "invoice\r\nBcc: victim@evil.example",
    "invoice\nX-Mailmoat-Review: approve 0123",
    "=?UTF-8?B?5pys5b2T44Gu5Lu25ZCN?=",
    "<script>alert(1)</script> \"quoted\" <b@c>",
    "\x1b$B$\"\x1b(B escape",
    "見積書 📎 emoji",
    "x" * 5000,
    "\u2028line\u2029separators\x85",
])
def test_a_hostile_subject_or_file_name_stays_text(hostile: str) -> None:
    record = review("approve", subject=hostile, attachments=[hostile, "ok.pdf"])
    for raw in (NOTICES.render_for_sender(record, LINKS, "ja"),
                NOTICES.render_for_approver(record, "boss@example.jp", LINKS, "en")):
        message, subject, body = read(raw)
        assert list(message.keys()) == EXPECTED_HEADERS  # nothing added, nothing broken
        head = raw.split(b"\r\n\r\n")[0]
        assert all(len(line) <= 78 for line in head.split(b"\r\n"))
        assert b"\x1b" not in head  # escapes only inside encoded words
        assert "\n" not in subject and "\r" not in subject
        clean = " ".join(re.sub(r"[\x00-\x1f\x7f\u2028\u2029\x85]+", " ", hostile).split())
        assert clean[:200] in " ".join(subject.split())  # the whole text, decoded
        if "=?" in hostile:
            assert "=?UTF-8?B?5pys" in subject  # shown as written, not decoded twice
        assert "ok.pdf" in body


def test_a_link_cannot_bring_its_own_lines() -> None:
    links = dict(LINKS, cancel="https://x/review/T\r\nBcc: a@evil.example")
    message, _, body = read(NOTICES.render_for_sender(review(), links, "en"))
    assert "Bcc" not in message and "https://x/review/T Bcc: a@evil.example" in body


def test_english_ascii_stays_7bit_and_an_emoji_in_japanese_falls_back_to_utf8() -> None:
    record = review(subject="Quote", attachments=["quote.pdf"])
    message, _, _ = read(NOTICES.render_for_sender(record, LINKS, "en"))
    assert message["Content-Transfer-Encoding"] == "7bit"
    assert message.get_content_charset() == "utf-8"
    message, subject, body = read(NOTICES.render_for_sender(review(subject="見積 😀"),
                                                            LINKS, "ja"))
    assert message.get_content_charset() == "utf-8" and "見積 😀" in body
    assert message["Subject"].startswith("=?UTF-8?B?") and subject.endswith("見積 😀")


def test_long_lists_are_cut_with_a_count() -> None:
    record = review(recipients=[f"r{i}@partner.example" for i in range(300)])
    _, _, body = read(NOTICES.render_for_sender(record, LINKS, "en"))
    assert "r49@partner.example" in body and "r50@partner.example" not in body
    assert "and 250 more" in body


def test_an_unusable_address_is_a_clear_error() -> None:
    with pytest.raises(ReviewError, match="ASCII address"):
        NOTICES.render_for_approver(review("approve"), "上司@例え.jp", LINKS, "ja")
    with pytest.raises(ReviewError, match="Message-ID"):
        ReviewNotices("a@b.example", "bad host\r\nX: y").render_for_sender(review(), LINKS,
                                                                           "ja")


def test_every_shipped_template_loads_and_an_unknown_language_gets_english() -> None:
    for kind in KINDS:
        for lang in LANGUAGES:
            assert load_template(kind, lang).subject
    _, subject, _ = read(NOTICES.render_for_sender(review(), LINKS, "../../etc"))
    assert subject.startswith("Held for sending:")


def test_a_template_of_ones_own_is_used_and_a_typo_in_it_is_reported(tmp_path: Path) -> None:
    (tmp_path / "delay.en.txt").write_text("Subject: Wait {subject}\n\nBy {deadline}: "
                                           "{cancel_link}\n")
    own = ReviewNotices("a@example.jp", "mx.example.jp", templates=tmp_path, tz=JST)
    _, subject, body = read(own.render_for_sender(review(subject="Q"), LINKS, "en"))
    assert subject == "Wait Q" and LINKS["cancel"] in body
    (tmp_path / "delay.en.txt").write_text("Subject: {subjet}\n\n{\n")
    with pytest.raises(TemplateError) as caught:
        own.render_for_sender(review(), LINKS, "en")
    assert "unknown placeholder {subjet}" in str(caught.value)
    assert "unbalanced" in str(caught.value)
    (tmp_path / "delay.en.txt").write_text("no subject line\n")
    with pytest.raises(TemplateError, match="Subject"):
        own.render_for_sender(review(), LINKS, "en")


def test_a_value_holding_a_placeholder_stays_as_written() -> None:
    _, _, body = read(NOTICES.render_for_sender(review(subject="{cancel_link} {{x}}"),
                                                LINKS, "en"))
    assert "{cancel_link} {{x}}" in body


def test_base64_bodies_end_in_crlf() -> None:
    message, _, body = read(NOTICES.render_for_sender(review(subject="見積 😀"), LINKS, "ja"))
    raw = base64.b64decode(message.get_payload())
    assert raw.endswith(b"\r\n") and b"\r\n" in raw


def test_build_mail_itself_keeps_a_subject_on_its_header() -> None:
    from milters.core.review.mail import build_mail
    raw = build_mail(from_addr="a@example.jp", to_addrs=["b@example.jp"],
                     subject="Hi\r\nBcc: c@evil.example", body="x", lang="en",
                     hostname="mx.example.jp", in_reply_to="<x@y>\r\nBcc: d@evil.example")
    message, subject, _ = read(raw)
    assert list(message.keys()) == EXPECTED_HEADERS and subject == "Hi Bcc: c@evil.example"
