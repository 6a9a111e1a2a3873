"""The message model and verdict types on the samples and on hostile input."""
from __future__ import annotations

from pathlib import Path

import pytest

from milters.core.message import Envelope, Message, Recipient, decode_words, strip_brackets
from milters.core.verdict import Action, SmtpReply, Verdict
from tests.conftest import ROOT

SAMPLES = sorted((ROOT / "samples").glob("*.eml"))


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_every_sample_parses_with_a_readable_subject(path: Path) -> None:
    message = Message(path.read_bytes())
    assert message.subject and "=?" not in message.subject
    assert message.raw == path.read_bytes()  # raw bytes are kept exactly


def test_japanese_windows_extensions_in_subject_and_from() -> None:
    message = Message((ROOT / "samples" / "plain-ja-iso2022jp.eml").read_bytes())
    assert message.subject == "【ご連絡】見積書の件 ①"
    assert message.header_text("from") == "髙橋 一郎 <takahashi@partner.example>"


def test_folded_and_broken_encoded_words_never_raise() -> None:
    assert decode_words("=?UTF-8?B?5pel5pys?=\r\n =?UTF-8?B?6Kqe?=") == "日本語"
    assert decode_words("=?x-unknown?Q?caf=E9?=") == "caf\ufffd"
    assert decode_words("=?UTF-8?B?not base64!!?=")  # some text, no exception
    assert decode_words("=?ISO-2022-JP?B?GyRCLSEbKEI=?=") == "①"


@pytest.mark.parametrize("raw", [
    b"",
    b"\x00\x00\x00",
    b"Subject: bare LF\nFrom: a@b\n\nbody\n",
    b"Content-Type: multipart/mixed; boundary=\"x\"\r\n\r\n--x\r\nno end",
    b"Subject: " + b"A" * 1_000_000 + b"\r\n\r\n",
    b"Subject: =?UTF-8?B?\xff\xfe?=\r\n\r\n",
])
def test_hostile_messages_give_text_not_tracebacks(raw: bytes) -> None:
    message = Message(raw)
    assert isinstance(message.subject, str)
    assert message.email is not None


def test_envelope_normalizes_client_addresses() -> None:
    assert str(Envelope(client_ip="::ffff:192.0.2.7").client_address) == "192.0.2.7"
    assert Envelope(client_ip="not-an-ip").client_address is None
    assert Envelope(client_ip=None).client_address is None
    env = Envelope(mail_from="Taro@Example.JP", recipients=[Recipient("a@x"),
                                                             Recipient("b@x", rejected_by_mta=True)])
    assert env.sender_domain == "example.jp"
    assert [r.address for r in env.accepted_recipients()] == ["a@x"]
    assert strip_brackets("<>") == ""


def test_message_rebuilt_from_milter_callbacks_uses_crlf() -> None:
    message = Message.from_headers_and_body([("Subject", "hi"), ("X-A", "b")], b"body\r\n")
    assert message.raw == b"Subject: hi\r\nX-A: b\r\n\r\nbody\r\n"
    assert message.subject == "hi"


def test_replies_and_verdicts_are_checked() -> None:
    reply = SmtpReply.parse("451 4.7.1 Try later")
    assert (reply.code, reply.enhanced, reply.text) == (451, "4.7.1", "Try later")
    assert str(SmtpReply.parse("550 Rejected")) == "550 Rejected"
    with pytest.raises(ValueError):
        SmtpReply.parse("451 5.7.1 mixed classes")
    with pytest.raises(ValueError):
        Verdict(Action.TEMPFAIL, SmtpReply.parse("550 5.7.1 no"))
    with pytest.raises(ValueError):
        Verdict(Action.REJECT, SmtpReply.parse("451 4.7.1 no"))
    assert not Verdict.cont().ends_transaction and Verdict.discard().ends_transaction
