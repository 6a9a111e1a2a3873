"""mta/operations: what the console shows of a message. Japanese subjects and file names in
every encoding mail uses (and broken ones), HTML turned into text, hostile MIME bounded."""
from __future__ import annotations

import base64
from email.header import Header
from pathlib import Path

import pytest

from milters.core.jis import encode_cp50220
from mta.console.identity import Actor
from mta.operations import Operations
from mta.operations import view as view_module
from mta.operations.decode import decode_header
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id

ADMIN = Actor("alice", "admin", frozenset(), "192.0.2.1")
# As Outlook sends it: CP50220 (NEC row 13 included), which Python's codecs cannot write.
JIS_SUBJECT = "=?ISO-2022-JP?B?" + base64.b64encode(
    encode_cp50220("会議資料の送付（①㈱）")).decode() + "?="


def enqueue(queue: Queue, raw: bytes) -> str:
    return queue.enqueue(raw, Envelope(new_queue_id(), "x@outside.example",
                                       [RecipientState("taro@example.jp")], 1_795_900_000.0,
                                       hold_reason="held for review"))


@pytest.fixture
def ops(tmp_path: Path) -> Operations:
    return Operations(Queue(tmp_path / "spool"))


@pytest.mark.parametrize("raw, shown", [
    (JIS_SUBJECT.encode(), "会議資料の送付（①㈱）"),  # CP50220: NEC row 13 included
    (Header("日本語の件名", "utf-8").encode().encode(), "日本語の件名"),
    ("生の UTF-8 件名".encode(), "生の UTF-8 件名"),  # 8-bit, no encoded words (RFC 6532)
    ("シフトJIS".encode("cp932"), "シフトJIS"),  # raw Shift_JIS from an old client
    (b"\x1b$B%F%9%H\x1b(B raw JIS", "テスト raw JIS"),  # raw ISO-2022-JP, no encoded words
    (b"=?UTF-8?B?5pel5pys?= =?UTF-8?B?6Kqe?=", "日本語"),  # adjacent words join
])
def test_japanese_subjects_in_the_list_and_the_view(ops: Operations, raw: bytes,
                                                    shown: str) -> None:
    queue_id = enqueue(ops.queue, b"Subject: " + raw + b"\r\n\r\nbody\r\n")
    assert ops.held(ADMIN).items[0].subject == shown
    assert ops.message(ADMIN, queue_id).subject == shown
    assert [i.queue_id for i in ops.held(ADMIN, query=shown[:3]).items] == [queue_id]


@pytest.mark.parametrize("raw", [
    b"=?UTF-8?B?////?=",  # bytes that are no UTF-8
    b"=?x-no-such-charset?B?5pel?=",
    b"=?ISO-2022-JP?B?GyRCJUYlOSVI?=",  # JIS without the escape back to ASCII
    b"=?UTF-8?Q?bad=ZZ=?=",
    b"\xff\xfe\x00broken \x1b$B\x7f\x7f",
    b"=?UTF-8?B?" + b"A" * 5000 + b"?=",
])
def test_broken_encodings_are_shown_with_replacements_never_raised(ops: Operations,
                                                                  raw: bytes) -> None:
    queue_id = enqueue(ops.queue, b"Subject: " + raw + b"\r\nFrom: " + raw + b"\r\n\r\nx\r\n")
    subject = ops.message(ADMIN, queue_id).subject
    assert subject == ops.held(ADMIN).items[0].subject
    assert "\x00" not in subject and "\r" not in subject and len(subject) <= 2100


def test_a_subject_cannot_fake_lines() -> None:
    assert decode_header("Hi\r\n X-Injected: yes\x00\x1b[31m") == "Hi X-Injected: yes [31m"
    assert decode_header(Header("a\r\nb", "utf-8").encode()) == "a b"


def _multipart(*parts: bytes, boundary: str = "BOUND") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    return (b"Subject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="
            + boundary.encode() + b"\r\n\r\n" + body + b"--" + boundary.encode() + b"--\r\n")


def test_japanese_file_names_and_the_attachment_list(ops: Operations) -> None:
    jis_word = Header("見積書.pdf", "iso-2022-jp").encode().encode()
    raw = _multipart(
        b"Content-Type: text/plain; charset=iso-2022-jp\r\n\r\n"
        + "本文です。".encode("iso-2022-jp"),
        b"Content-Type: application/pdf; name=\"" + jis_word + b"\"\r\n"
        b"Content-Disposition: attachment; filename=\"" + jis_word + b"\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"%PDF" * 100),
        b"Content-Type: application/zip\r\nContent-Disposition: attachment;"
        b" filename*=UTF-8''%E8%B3%87%E6%96%99.zip\r\n\r\nPK",
        b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;"
        b" filename=\"\xe7\x94\x9f.bin\"\r\n\r\nraw",  # raw UTF-8 in a parameter
        b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;"
        b" filename*=x-bogus''%FF%FE.bin\r\n\r\nraw")
    view = ops.message(ADMIN, enqueue(ops.queue, raw))
    assert [(a.name, a.content_type, a.size) for a in view.attachments][:4] == [
        ("見積書.pdf", "application/pdf", 400), ("資料.zip", "application/zip", 2),
        ("生.bin", "application/octet-stream", 3), (view.attachments[3].name,
                                                   "application/octet-stream", 3)]
    assert view.attachments[3].name.endswith(".bin")
    assert [t.text for t in view.texts] == ["本文です。"] and not view.truncated


def test_html_is_shown_as_text_and_script_never_survives(ops: Operations) -> None:
    html = (b"<html><head><title>t</title><script>alert('head')</script></head><body>"
            b"<p>Hello <b>there</b></p><img src=x onerror=alert(1)>"
            b"<a href=\"javascript:alert(2)\">click</a><style>p{}</style>"
            b"<scr<script>x</script>ipt>alert(3)</script><!-- <script>c</script> -->"
            b"&lt;script&gt;shown as text&lt;/script&gt;<svg><script>alert(4)</script></svg>"
            b"</body></html>")
    raw = _multipart(b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html)
    [text] = ops.message(ADMIN, enqueue(ops.queue, raw)).texts
    assert text.from_html and text.content_type == "text/html"
    assert "Hello there" in text.text and "click" in text.text
    for gone in ("alert('head')", "alert(1)", "alert(2)", "alert(4)", "javascript:",
                 "onerror", "<b>", "<p>", "<a", "<img"):
        assert gone not in text.text, gone
    # Escaped markup in the HTML is text about a tag; the web layer escapes it again.
    assert "<script>shown as text</script>" in text.text


def test_authentication_results_and_headers(ops: Operations) -> None:
    raw = (b"Authentication-Results: mx.mailmoat.test; dmarc=fail header.from=example.com\r\n"
           b"Authentication-Results: mx.mailmoat.test; spf=pass\r\n"
           b"Subject: x\r\n\r\nbody\r\n")
    view = ops.message(ADMIN, enqueue(ops.queue, raw))
    assert view.auth_results == ["mx.mailmoat.test; dmarc=fail header.from=example.com",
                                 "mx.mailmoat.test; spf=pass"]
    assert ("Subject", "x") in view.headers and view.envelope["hold_reason"] == "held for review"


def _counting_walk(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the parts the view visits: bounded work, whatever the message holds."""
    visited: list[int] = []
    real = view_module._leaf

    def leaf(part, walk):  # type: ignore[no-untyped-def]
        visited.append(1)
        real(part, walk)
    monkeypatch.setattr(view_module, "_leaf", leaf)
    return visited


def test_ten_thousand_parts_give_a_bounded_view(ops: Operations,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    visited = _counting_walk(monkeypatch)
    raw = _multipart(*[b"Content-Type: text/plain\r\n\r\npart %d" % i for i in range(10_000)])
    view = ops.message(ADMIN, enqueue(ops.queue, raw))
    assert view.truncated and any("500 MIME parts" in note for note in view.notes)
    assert len(visited) < view_module.MAX_PARTS
    assert sum(len(t.text) for t in view.texts) <= view_module.MAX_TEXT


def test_nested_a_hundred_deep_no_boundary_and_huge_headers(ops: Operations) -> None:
    nested = b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for depth in range(100):
        nested = _multipart(nested, boundary=f"b{depth}")[len(b"Subject: parts\r\n"):]
    deep = ops.message(ADMIN, enqueue(ops.queue, b"Subject: deep\r\n" + nested))
    assert deep.truncated and any("deeper than 20" in note for note in deep.notes)
    no_boundary = b"Subject: nb\r\nContent-Type: multipart/mixed\r\n\r\nno parts at all\r\n"
    view = ops.message(ADMIN, enqueue(ops.queue, no_boundary))
    assert view.subject == "nb" and any("broken" in note for note in view.notes)
    huge = (b"Subject: " + b"A" * 1_000_000 + b"\r\n" + b"X-Many: y\r\n" * 10_000
            + b"\r\nbody\r\n")
    big = ops.message(ADMIN, enqueue(ops.queue, huge))
    assert len(big.subject) < 2100 and len(big.headers) == view_module.MAX_HEADERS
    assert big.truncated and ops.held(ADMIN, query="nomatch").total == 0


def test_a_fifty_megabyte_message_is_read_only_in_part(ops: Operations,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view_module, "MAX_READ", 1024 * 1024)
    import mta.operations.core as core
    monkeypatch.setattr(core, "MAX_READ", 1024 * 1024)
    body = base64.encodebytes(b"\0" * (37 * 1024 * 1024)).replace(b"\n", b"\r\n")
    raw = _multipart(b"Content-Type: text/plain\r\n\r\nsee attached",
                     b"Content-Type: application/octet-stream; name=big.bin\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n" + body)
    assert len(raw) > 50_000_000
    view = ops.message(ADMIN, enqueue(ops.queue, raw))
    assert view.size == len(raw) and view.truncated
    assert any(f"first {1024 * 1024} of {len(raw)} bytes" in note for note in view.notes)
    assert view.texts[0].text == "see attached"
    assert not any("broken" in note for note in view.notes)  # cut, not broken
