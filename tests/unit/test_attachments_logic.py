"""The attachments milter's decision at end of message, with re-injection captured instead of
sent (the integration tests send it for real): who gets the password notice, partners'
agreed passwords, clients that always pass, and the loop guard."""
from __future__ import annotations

import email
from datetime import datetime, timezone
from email import policy as email_policy
from pathlib import Path

import pytest

from milters.attachments.logic import LOOP_HEADER, AttachmentsChecker
from milters.core.mime.parts import find_attachments
from milters.core.edits import DeleteRecipient, ReplaceBody
from milters.core.message import Envelope, Message, Recipient
from milters.core.policy.document import load_policy_text
from mta.cli import EXTENSIONS

ROOT = Path(__file__).resolve().parents[2]
RAW = (ROOT / "samples" / "ppap-attachment-ja.eml").read_bytes().replace(
    b"\r\n", b"\n").replace(b"\n", b"\r\n")
NOW = datetime(2026, 11, 28, 10, 30, tzinfo=timezone.utc)
BASE = """\
internal_networks: [127.0.0.0/8, 10.0.0.0/8]
rules:
  - name: outside
    when: {direction: outbound, recipient: ["*", "!@example.jp"]}
    then: {attachments: encrypt}
"""


class Captured:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str], bytes]] = []

    def __call__(self, listen: str, mail_from: str, rcpts: list[str], raw: object,
                 timeout: float) -> str:
        data = raw if isinstance(raw, bytes) else b"".join(raw)  # type: ignore[arg-type]
        self.sent.append((mail_from, list(rcpts), data))
        return "250 2.0.0 Ok"


def run(policy_extra: str, rcpts: list[str], client: str = "10.1.0.5",
        raw: bytes = RAW) -> tuple[list[object], Captured]:
    policy = load_policy_text(BASE + policy_extra, EXTENSIONS)
    captured = Captured()
    checker = AttachmentsChecker("mx.example.jp", "127.0.0.1:10026", clock=lambda: NOW,
                                 send=captured)
    env = Envelope(client_ip=client, mail_from="hanako@example.jp",
                   recipients=[Recipient(r) for r in rcpts])
    result = checker.check(Message(raw=raw, envelope=env), policy)
    return result.edits, captured


def notices(captured: Captured) -> list[tuple[list[str], str]]:
    found = []
    for mail_from, rcpts, data in captured.sent:
        message = email.message_from_bytes(data, policy=email_policy.default)
        if mail_from == "" and LOOP_HEADER in message:
            found.append((rcpts, str(message["To"])))
    return found


def test_notice_to_both_reaches_sender_and_recipients_in_one_mail() -> None:
    _, captured = run("attachments: {notice: {to: both}}\n", ["buyer@customer.example"])
    assert notices(captured) == [(["hanako@example.jp", "buyer@customer.example"],
                                  "hanako@example.jp, buyer@customer.example")]


def test_notice_to_recipients_only() -> None:
    _, captured = run("attachments: {notice: {to: recipients}}\n", ["buyer@customer.example"])
    assert [rcpts for rcpts, _ in notices(captured)] == [["buyer@customer.example"]]


def test_a_partners_agreed_password_opens_the_zip(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import tempfile
    monkeypatch.setenv("MAILMOAT_TEST_PARTNER_PW", "Partner%Y%m")
    extra = ('attachments: {encrypt: {password: {fixed: [{recipients: ["@partner.example"], '
             'password_env: MAILMOAT_TEST_PARTNER_PW}]}}}\n')
    edits, captured = run(extra, ["buyer@partner.example"])
    (body,) = [e for e in edits if isinstance(e, ReplaceBody)]
    new_body = body.body if isinstance(body.body, bytes) else body.body.read()
    head = RAW[:RAW.index(b"\r\n\r\n") + 4]
    (archive,) = find_attachments(email.message_from_bytes(head + new_body,
                                                           policy=email_policy.default))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.zip"
        path.write_bytes(archive.data)
        done = subprocess.run(["7z", "t", "-pPartner202611", str(path)], capture_output=True)
    assert done.returncode == 0, done.stdout
    assert len(notices(captured)) == 1  # the partner still gets told, as with any password


def test_clients_in_pass_clients_are_never_touched() -> None:
    edits, captured = run("attachments: {pass_clients: [10.1.0.0/16]}\n",
                          ["buyer@customer.example"])
    assert edits == [] and captured.sent == []


def test_the_loop_guard_is_honoured_only_from_loopback() -> None:
    guarded = RAW.replace(b"MIME-Version: 1.0", f"{LOOP_HEADER}: copy\r\nMIME-Version: 1.0"
                          .encode(), 1)
    edits, captured = run("", ["buyer@customer.example"], client="127.0.0.1", raw=guarded)
    assert edits == [] and captured.sent == []
    # From an internal client elsewhere the header proves nothing: the ZIP is still made.
    edits, captured = run("", ["buyer@customer.example"], client="10.1.0.5", raw=guarded)
    assert any(isinstance(e, ReplaceBody) for e in edits)


def test_split_takes_the_zipped_recipient_off_the_original() -> None:
    edits, captured = run("", ["buyer@customer.example", "taro@example.jp"])
    assert DeleteRecipient("buyer@customer.example") in edits
    assert not any(isinstance(e, ReplaceBody) for e in edits)  # the original stays intact
    copies = [rcpts for mail_from, rcpts, _ in captured.sent if mail_from]
    assert copies == [["buyer@customer.example"]]
