"""Fail closed: broken and hostile MIME through the attachments checker with "encrypt
everything". Every file hidden in a case ends up inside the ZIP (opened with 7z, compared
byte for byte) and nowhere in the clear, or the message is tempfailed; the output, edits
applied by the MTA's own applier, re-parses. (Through the real milter and our MTA:
tests/integration/test_attachments_milter.py.)"""
from __future__ import annotations

import email
from datetime import datetime, timezone
from email import policy as email_policy
from pathlib import Path

import pytest

from milters.attachments.logic import AttachmentsChecker
from milters.core.edits import DeleteRecipient
from milters.core.message import Envelope, Message, Recipient
from milters.core.policy.document import load_policy_text
from milters.core.verdict import Action
from mta.cli import EXTENSIONS
from mta.chain.edits_apply import Transit, apply_edits
from tests.harness.attfail_cases import CASES, HEAD, Case, check_protected, notice_password

NOW = datetime(2026, 11, 28, 10, 30, tzinfo=timezone.utc)
EVERYTHING = """\
internal_networks: [127.0.0.0/8, 10.0.0.0/8]
rules:
  - name: encrypt-everything
    when: {direction: outbound}
    then: {attachments: encrypt}
"""
RCPT = "buyer@customer.example"


def run(raw: bytes, extra: str = "") -> tuple[object, bytes | None, list[bytes]]:
    """The verdict, the message as the edits leave it (None when it was not changed), and
    the notices sent."""
    policy = load_policy_text(EVERYTHING + extra, EXTENSIONS)
    sent: list[bytes] = []

    def send(listen: str, mail_from: str, rcpts: list[str], data: object,
             timeout: float) -> str:
        sent.append(data if isinstance(data, bytes) else b"".join(data))  # type: ignore
        return "250 2.0.0 Ok"
    checker = AttachmentsChecker("mx.example.jp", "127.0.0.1:10026", clock=lambda: NOW,
                                 send=send)
    env = Envelope(client_ip="10.1.0.5", mail_from="hanako@example.jp",
                   recipients=[Recipient(RCPT)])
    result = checker.check(Message(raw=raw, envelope=env), policy)
    if not result.edits:
        return result.verdict, None, sent
    assert not any(isinstance(e, DeleteRecipient) for e in result.edits)
    out = apply_edits(Transit(raw, "hanako@example.jp", [(RCPT, None)]), result.edits).raw
    return result.verdict, out, sent


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_hidden_file_is_in_the_zip_and_none_in_the_clear(case: Case,
                                                               tmp_path: Path) -> None:
    verdict, out, sent = run(case.raw)
    assert verdict.action == Action.CONTINUE, verdict  # type: ignore[attr-defined]
    assert out is not None, f"{case.name}: passed untouched"
    (notice,) = sent
    check_protected(case, out, notice_password(notice), tmp_path)
    # What we wrote re-parses without a structural defect.
    parsed = email.message_from_bytes(out, policy=email_policy.default)
    for part in parsed.walk():
        assert not part.defects, (case.name, part.defects)
    assert [n.lower() for n in parsed.keys()].count("content-type") == 1


# Structures the core cannot read with certainty: the whole message is the attachment.
# (An RFC 2231 boundary, bare CR line ends and 60-deep nesting are read by the core now,
# core.mime.scan: those messages are split and each file protected, the test above.)
WHOLE = [c for c in CASES if c.name in {
    "missing-final-boundary", "no-opening-delimiter",
    "multipart-without-boundary", "base64-encoded-multipart",
    "uuencode-in-the-preamble", "no-blank-line-after-part-header"}]


@pytest.mark.parametrize("case", WHOLE, ids=[c.name for c in WHOLE])
def test_encrypt_whole_puts_the_message_as_it_came_into_the_zip(case: Case,
                                                                 tmp_path: Path) -> None:
    from tests.harness.attfail_cases import open_zip, zip_and_clear
    _, out, sent = run(case.raw)
    assert out is not None
    archive, _ = zip_and_clear(out)
    assert archive is not None
    (entry,) = open_zip(archive, notice_password(sent[0]), tmp_path)
    assert entry == case.raw  # original.eml: byte for byte what came


@pytest.mark.parametrize("case", WHOLE, ids=[c.name for c in WHOLE])
def test_on_unparsable_tempfail_answers_451(case: Case,
                                            caplog: pytest.LogCaptureFixture) -> None:
    verdict, out, sent = run(case.raw, "attachments: {on_unparsable: tempfail}\n")
    assert verdict.action == Action.TEMPFAIL  # type: ignore[attr-defined]
    assert str(verdict.reply).startswith("451 4.3.0")  # type: ignore[attr-defined]
    assert out is None and sent == []
    assert "event=attachments_unparsable" in caplog.text and "then=tempfail" in caplog.text


def test_a_well_formed_message_is_not_doubted(caplog: pytest.LogCaptureFixture) -> None:
    """The checks do not fire on ordinary mail: the file alone goes into the ZIP."""
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\nHello\r\n--b\r\n"
           b"Content-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64"
           b"\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n")
    _, out, _ = run(raw)
    assert out is not None and b"Hello" in out
    assert "attachments_unparsable" not in caplog.text
    assert "attachments_doubted" not in caplog.text


@pytest.mark.parametrize("value, says", [("encrypt_whole", "original.eml"),
                                         ("tempfail", "451 4.3.0")])
def test_policy_explain_tells_what_on_unparsable_does(value: str, says: str) -> None:
    from milters.attachments.extension import explain
    policy = load_policy_text(EVERYTHING + f"attachments: {{on_unparsable: {value}}}\n",
                              EXTENSIONS)
    env = Envelope(client_ip="10.1.0.5", mail_from="hanako@example.jp",
                   recipients=[Recipient(RCPT)])
    lines = explain(policy, env)
    assert any(says in line and f"on_unparsable: {value}" in line for line in lines), lines


def test_on_unparsable_refuses_an_unknown_value() -> None:
    from milters.core.errors import ConfigError
    with pytest.raises(ConfigError, match="on_unparsable"):
        load_policy_text(EVERYTHING + "attachments: {on_unparsable: pass}\n", EXTENSIONS)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_delete_rules_remove_what_they_cannot_classify(case: Case) -> None:
    """With `delete`, the same parts (or the whole message) are removed, never kept."""
    from tests.harness.attfail_cases import zip_and_clear
    policy = EVERYTHING.replace("{attachments: encrypt}", "{attachments: delete}")
    sent_delete: list[bytes] = []
    checker = AttachmentsChecker(
        "mx.example.jp", "127.0.0.1:10026", clock=lambda: NOW,
        send=lambda *a: sent_delete.append(b"") or "250 2.0.0 Ok")  # type: ignore[misc]
    env = Envelope(client_ip="10.1.0.5", mail_from="hanako@example.jp",
                   recipients=[Recipient(RCPT)])
    result = checker.check(Message(raw=case.raw, envelope=env),
                           load_policy_text(policy, EXTENSIONS))
    assert result.edits, case.name
    out = apply_edits(Transit(case.raw, "hanako@example.jp", [(RCPT, None)]),
                      result.edits).raw
    archive, clear = zip_and_clear(out)
    assert archive is None and sent_delete == []  # nothing to unlock: no notice
    for hidden in case.hidden:
        for probe in (hidden.data[:64], hidden.wire[:64].strip()):
            if len(probe) >= 16:
                assert probe not in clear and probe not in out, case.name


def test_a_message_folded_into_its_from_field_is_tempfailed_whatever_the_policy(
        caplog: pytest.LogCaptureFixture) -> None:
    """Postfix 3.7 reads a bare-CR message as one From field and rewrites it as addresses;
    the files' base64 is in that field. A ZIP cannot hold a header, so even with
    on_unparsable: encrypt_whole the message is tempfailed, not passed."""
    import base64
    data = base64.b64encode(bytes(range(256)) * 4).decode()
    folded = (f"From: a@example.jp To:b@example.com MIME-Version:1.0 Content-Type:multipart/"
              f"mixed;boundary= \"=_b1\" --=_b1 Content-Type: application/pdf@mx.example.jp,"
              f"\r\n\t{data[:76]}@mx.example.jp,\r\n\t{data[76:152]}@mx.example.jp\r\n"
              f"To: buyer@customer.example\r\n\r\n").encode()
    verdict, out, sent = run(folded, "attachments: {on_unparsable: encrypt_whole}\n")
    assert verdict.action == Action.TEMPFAIL and out is None and sent == []  # type: ignore
    assert "MIME header fields and a body inside a header field" in caplog.text


def test_signatures_and_a_subject_about_content_type_are_not_a_folded_message() -> None:
    """A DKIM-Signature lists Content-Type in h= and carries base64 in b=; a Subject may
    name a header. Neither is a message folded into a field."""
    import base64
    sig = base64.b64encode(bytes(range(200))).decode()
    raw = (HEAD.replace(b"Subject: files", b"Subject: Content-Type: text/plain? " + b"A" * 70)
           + f"DKIM-Signature: v=1; a=rsa-sha256; d=example.jp; s=s;\r\n\th=from:to:"
           f"subject:content-type:mime-version; bh={sig[:44]};\r\n\tb={sig}\r\n".encode()
           + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\nHello\r\n--b\r\n"
           b"Content-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64"
           b"\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n")
    verdict, out, _ = run(raw)
    assert verdict.action == Action.CONTINUE and out is not None  # type: ignore
