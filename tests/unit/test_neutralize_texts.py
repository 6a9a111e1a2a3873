"""Every readable part of a hostile message is neutralized: URLs nested in other URLs, text
in message/* reports and embedded messages, parts in unknown charsets or with broken
transfer encodings. Checked the way a client reads the output (tests/harness/live_urls.py:
the message parsed, every text part decoded, every token read as a URL), never grepped.

The checker is called the way the milter calls it (no attachment here needs the sandbox).
"""
from __future__ import annotations

import base64
import email
from email import policy as email_policy

import pytest

from milters.core.edits import ReplaceBody
from milters.core.message import Envelope, Message, Recipient
from milters.core.policy.document import load_policy_text
from milters.core.verdict import Action
from milters.neutralize.logic import MARK_HEADER, NeutralizeChecker
from mta.cli import EXTENSIONS
from mta.chain.edits_apply import Transit, apply_edits
from tests.harness.live_urls import live_urls

POLICY = """\
internal_networks: [127.0.0.0/8]
neutralize:
  on_failure: drop
{extra}
rules:
  - name: strangers
    when: {{direction: inbound}}
    then: {{neutralize: neutralize}}
"""
CHECKER = NeutralizeChecker("mx.example.jp")
HEAD = (b"From: a@outside.example\r\nTo: t@example.jp\r\nSubject: s\r\n"
        b"Message-ID: <m@outside.example>\r\nMIME-Version: 1.0\r\n")
NESTED = ("Go https://a.example/r?u=http://evil.example/x or "
          "https://a.example/r?u=http%3A%2F%2Fevil.example%2Fy today\r\n")


def run(raw: bytes, extra: str = "") -> tuple[object, bytes]:
    policy = load_policy_text(POLICY.format(extra=extra), EXTENSIONS)
    env = Envelope(client_ip="198.51.100.7", mail_from="a@outside.example", queue_id="Q1",
                   recipients=[Recipient("t@example.jp")])
    result = CHECKER.check(Message(raw=raw, envelope=env), policy)
    edits = [ReplaceBody(e.body if isinstance(e.body, bytes) else e.body.read())
             if isinstance(e, ReplaceBody) else e for e in result.edits]
    return result, apply_edits(Transit(raw, "a@outside.example"), edits).raw


def mixed(*parts: bytes) -> bytes:
    body = b"".join(b"--B\r\n" + part + b"\r\n" for part in parts)
    return HEAD + b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n' + body + b"--B--\r\n"


def note(out: bytes) -> str:
    message = email.message_from_bytes(out, policy=email_policy.default)
    for part in message.walk():
        if part.get_filename() == "mailmoat-note.txt":
            return part.get_content()
    raise AssertionError("no note")


def all_text(out: bytes) -> str:
    message = email.message_from_bytes(out, policy=email_policy.compat32)
    return "".join((part.get_payload(decode=True) or b"").decode("utf-8", "replace")
                   for part in message.walk() if not part.is_multipart())


def links_counted(out: bytes) -> int:
    message = email.message_from_bytes(out, policy=email_policy.default)
    return int(str(message[MARK_HEADER]).split("links=")[1].split(";")[0])


def test_nested_urls_in_a_text_body_leave_nothing_live_and_are_counted() -> None:
    raw = HEAD + b"Content-Type: text/plain\r\n\r\n" + NESTED.encode()
    assert len(live_urls(raw)) >= 3
    _, out = run(raw)
    assert live_urls(out) == []
    assert links_counted(out) == 4  # two outer and two inner
    assert "4 link(s) were disabled" in note(out)


REPORTS = {
    "message/feedback-report": (b"Feedback-Type: abuse\r\nUser-Agent: x/1\r\nVersion: 1\r\n"
                                b"Reported-Uri: https://evil.example/phish?u=http%3A%2F%2F"
                                b"b.example\r\nReported-Domain: evil.example\r\n"),
    "message/delivery-status": (b"Reporting-MTA: dns; mx.example\r\n\r\n"
                                b"Final-Recipient: rfc822; x@example.jp\r\nAction: failed\r\n"
                                b"Status: 5.0.0\r\nDiagnostic-Code: smtp; 550 see "
                                b"https://evil.example/why\r\n"),
    "message/disposition-notification": (b"Reporting-UA: www.evil.example; x\r\n"
                                         b"Disposition: manual-action/MDN-sent-manually; "
                                         b"displayed\r\n"),
    "message/news": (b"From: n@news.example\r\nNewsgroups: a.b\r\nSubject: n\r\n\r\n"
                     b"Read https://evil.example/news?u=https://c.example/\r\n"),
    "message/global-headers": b"Subject: https://evil.example/g\r\n",
}


@pytest.mark.parametrize("ctype", sorted(REPORTS))
def test_message_parts_that_are_text_have_their_urls_defanged(ctype: str) -> None:
    raw = mixed(b"Content-Type: text/plain\r\n\r\nA report.\r\n",
                f"Content-Type: {ctype}\r\n\r\n".encode() + REPORTS[ctype])
    assert live_urls(raw), "the attack is not live to begin with"
    result, out = run(raw)
    assert result.verdict.action is Action.CONTINUE
    assert live_urls(out) == []
    message = email.message_from_bytes(out, policy=email_policy.default)
    assert ctype in [p.get_content_type() for p in message.walk()]  # the report stays one
    assert links_counted(out) >= 1


def embedded(text: bytes, depth: int = 1, ctype: str = "message/rfc822") -> bytes:
    inner = (b"From: b@inner.example\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
             b'Content-Type: multipart/alternative; boundary="I"\r\n\r\n--I\r\n'
             b"Content-Type: text/plain\r\n\r\n" + text + b"\r\n--I\r\n"
             b"Content-Type: text/html\r\n\r\n<a href=\"https://evil.example/h\">x</a> "
             + text + b"\r\n--I--\r\n")
    for _ in range(depth - 1):
        inner = (b"From: c@inner.example\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: message/rfc822\r\n\r\n" + inner)
    return f"Content-Type: {ctype}\r\n\r\n".encode() + inner


@pytest.mark.parametrize("ctype", ["message/rfc822", "message/global"])
def test_kept_embedded_messages_have_their_inner_text_defanged(ctype: str) -> None:
    raw = mixed(b"Content-Type: text/plain\r\n\r\nForwarded.\r\n",
                embedded(NESTED.encode(), depth=3, ctype=ctype))
    assert live_urls(raw)
    _, out = run(raw, "  attachments: keep")
    assert live_urls(out) == []
    assert links_counted(out) >= 5
    inner = email.message_from_bytes(out, policy=email_policy.default)
    types = [p.get_content_type() for p in inner.walk()]
    assert ctype in types and sum(t.startswith("message/") for t in types) == 3


def test_embedded_messages_too_deep_are_removed_not_passed() -> None:
    raw = mixed(b"Content-Type: text/plain\r\n\r\nForwarded.\r\n",
                embedded(b"https://evil.example/deep", depth=12))
    _, out = run(raw, "  attachments: keep")
    assert live_urls(out) == []
    assert "read 8 deep" in note(out)


def test_a_text_file_kept_as_it_is_has_its_links_defanged() -> None:
    raw = mixed(b"Content-Type: text/plain\r\n\r\nSee the file.\r\n",
                b'Content-Type: text/plain\r\nContent-Disposition: attachment; '
                b'filename="links.txt"\r\n\r\n' + NESTED.encode())
    _, out = run(raw)
    assert live_urls(out) == []
    message = email.message_from_bytes(out, policy=email_policy.default)
    assert "links.txt" in [p.get_filename() for p in message.iter_attachments()]


# -- parts that cannot be read with certainty ---------------------------------------------
@pytest.mark.parametrize("header, body", [
    (b"Content-Type: text/plain; charset=x-no-such-charset\r\n",
     b"Go https://evil.example/a \xff\xfe now\r\n"),
    (b"Content-Type: text/plain; charset=utf-8\r\n", b"Go https://evil.example/a \xff\r\n"),
    # A base64 body that is really plain text: some clients show it raw.
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n",
     b"Click https://evil.example/b now!\r\n"),
    # Base64 with junk in it, the URL in the junk.
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n",
     base64.b64encode(b"Hello there") + b"\r\n<https://evil.example/c>\r\n"),
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-unknown\r\n",
     b"Go https://evil.example/d\r\n"),
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n",
     b"Go https=3A//evil.example/e =ZZ broken=\r\n"),
    (b"Content-Type: text/plain; charset=utf-16\r\n", b"Go https://evil.example/f\r\n"),
])
def test_a_text_part_that_cannot_be_read_with_certainty_is_still_defanged(
        header: bytes, body: bytes) -> None:
    raw = mixed(b"Content-Type: text/plain\r\n\r\nHello.\r\n", header + b"\r\n" + body)
    result, out = run(raw)
    assert result.verdict.action is Action.CONTINUE
    assert live_urls(out) == [], out
    assert "evil[.]example" in all_text(out)  # shown, defanged: not dropped silently


def test_a_multipart_too_deep_to_split_is_removed_not_passed() -> None:
    inner = b"Content-Type: text/plain\r\n\r\nhttps://evil.example/deep\r\n"
    for level in range(120):  # past the 100 levels the core splits (core.mime.scan)
        boundary = f"L{level}".encode()
        inner = (b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n--'
                 + boundary + b"\r\n" + inner + b"\r\n--" + boundary + b"--\r\n")
    raw = HEAD + inner
    _, out = run(raw)
    assert live_urls(out) == []
    assert "https" not in all_text(out)  # the part is gone, not defanged and kept
    # The core leaves a multipart past its depth limit as one opaque attachment; the
    # convert table's last row drops it, and the note says so.
    assert "attachment was removed" in note(out)


@pytest.mark.parametrize("ctype", ["message/external-body; access-type=URL; "
                                   "URL=\"https://evil.example/x\"",
                                   "message/partial; id=\"a@b\"; number=1; total=2"])
def test_message_parts_pointing_elsewhere_or_partial_are_removed(ctype: str) -> None:
    raw = mixed(b"Content-Type: text/plain\r\n\r\nHello.\r\n",
                f"Content-Type: {ctype}\r\n\r\nContent-Type: text/plain\r\n\r\n"
                "https://evil.example/p\r\n".encode())
    _, out = run(raw)
    assert live_urls(out) == []
    assert "removed" in note(out)
