"""The attachments milter (PPAP countermeasure) behind our own MTA and behind a private
Postfix: a message to one external and one internal recipient is split; the external one
gets the attachments in a ZIP that 7z and unzip open with the password from the notice,
the internal one gets the original, the sender gets exactly one notice, nobody two copies."""
from __future__ import annotations

import email
import re
import subprocess
import tempfile
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from milters.attachments.parts import find_attachments
from milters.core.jis import decode_cp50220
from tests.harness.milter_proc import ROOT, MilterProcess
from tests.harness.ports import free_port
from tests.harness.postfix import postfix_instance
from tests.harness.sink import SinkMessage, SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

SAMPLE = ROOT / "samples" / "ppap-attachment-ja.eml"
SENDER, EXTERNAL, INTERNAL = "hanako@example.jp", "buyer@customer.example", "taro@example.jp"
POLICY = """\
internal_networks: [127.0.0.0/8]
internal_domains: [example.jp]
attachments:
  notice: {to: sender, language: ja}
rules:
  - name: external-recipients-get-a-zip
    when: {direction: outbound, recipient: ["*", "!@example.jp"]}
    then: {attachments: encrypt}
"""


def parsed(item: SinkMessage) -> EmailMessage:
    message = email.message_from_bytes(item.data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def notice_text(message: EmailMessage) -> str:
    raw = message.get_payload(decode=True)
    assert isinstance(raw, bytes)
    charset = (message.get_content_charset() or "").lower()
    return decode_cp50220(raw) if charset == "iso-2022-jp" else raw.decode(charset or "utf-8")


def password_from(text: str) -> str:
    """The line after the ■パスワード heading of the ja notice."""
    found = re.search(r"■パスワード\s*\n\s*(\S+)", text)
    assert found, text
    return found.group(1)


@dataclass
class Delivered:
    zipped: EmailMessage  # the external recipient's copy
    original: EmailMessage  # the internal recipient's copy
    notice: EmailMessage


def sort_out(sink: SmtpSink, count: int = 3) -> Delivered:
    items = sink.wait_for(count, timeout=20)
    by_rcpt: dict[str, list[SinkMessage]] = {}
    for item in items:
        for rcpt in item.rcpt_tos:
            by_rcpt.setdefault(rcpt, []).append(item)
    # Exactly one delivery per recipient: nobody gets two copies.
    assert {r: len(v) for r, v in by_rcpt.items()} == {EXTERNAL: 1, INTERNAL: 1, SENDER: 1}, \
        [(i.mail_from, i.rcpt_tos) for i in items]
    notice = by_rcpt[SENDER][0]
    assert notice.mail_from == "<>"  # RFC 3834: auto-generated, null return path
    return Delivered(parsed(by_rcpt[EXTERNAL][0]), parsed(by_rcpt[INTERNAL][0]), parsed(notice))


def check_split_delivery(delivered: Delivered) -> None:
    original = email.message_from_bytes(SAMPLE.read_bytes(), policy=email.policy.default)
    originals = {a.filename: a.data for a in find_attachments(original)}
    # The internal recipient: the attachment as sent.
    assert {a.filename: a.data for a in find_attachments(delivered.original)} == originals
    # The external one: no attachment but the ZIP; the body text kept.
    found = find_attachments(delivered.zipped)
    assert [a.content_type for a in found] == ["application/zip"], [a.filename for a in found]
    assert re.fullmatch(r"AttachFile\.\d{8}\.zip", found[0].filename)
    body = delivered.zipped.get_body(preferencelist=("plain",))
    assert body is not None and "見積書" in body.get_content()
    # The notice: threaded to the original, in ISO-2022-JP, with the password.
    notice = delivered.notice
    assert notice["In-Reply-To"] == "<20261128101500.3@example.jp>"
    assert notice["Auto-Submitted"] == "auto-generated"
    assert notice.get_content_charset() == "iso-2022-jp"
    password = password_from(notice_text(notice))
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / found[0].filename
        archive.write_bytes(found[0].data)
        for tool in (["7z", "x", f"-p{password}", f"-o{tmp}/7z", str(archive)],
                     ["unzip", "-P", password, "-d", f"{tmp}/unzip", str(archive)]):
            done = subprocess.run(tool, capture_output=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
        # Names are CP932 bytes without the UTF-8 flag (checked byte by byte in
        # tests/unit/test_attachments_zip.py); here: every file comes back intact.
        for tool in ("7z", "unzip"):
            extracted = [p.read_bytes() for p in (Path(tmp) / tool).iterdir()]
            assert sorted(extracted) == sorted(originals.values()), tool
        wrong = subprocess.run(["7z", "x", "-pwrong", f"-o{tmp}/bad", str(archive)],
                               capture_output=True, timeout=60)
        assert wrong.returncode != 0


def test_split_delivery_through_our_mta(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        serve = Serve(tmp_path, policy=POLICY, relay=f"smtp:[127.0.0.1]:{sink.port}",
                      milters="milters: [{name: attachments}]\n")
        serve.config.write_text(serve.config.read_text().replace(
            "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]"))
        serve.start()
        try:
            result = run_swaks(serve.port, mail_from=SENDER, rcpt=[EXTERNAL, INTERNAL],
                               data_file=SAMPLE)
            assert result.code("DATA_END") == 250, result.transcript
            delivered = sort_out(sink)
        finally:
            serve.stop()
    check_split_delivery(delivered)
    log = serve.text()
    assert re.search(r"event=attachments .*action=encrypt .*delivered=re-injected", log), log
    assert "password=" not in log  # never logged unless the policy says so


def test_split_delivery_through_postfix(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    reinject_port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"gateway: {{hostname: mx.example.jp, reinject_listen: "
                      f"127.0.0.1:{reinject_port}}}\nstore: memory://\npolicy: policy.yaml\n")
    milter = MilterProcess("attachments", config, tmp_path).start()
    try:
        with SmtpSink() as sink, postfix_instance(
                tmp_path, relay_port=sink.port, smtpd_milters=milter.socket_spec,
                reinject_port=reinject_port,
                relay_domains="example.jp, customer.example") as postfix:
            result = run_swaks(postfix.smtp_port, mail_from=SENDER, rcpt=[EXTERNAL, INTERNAL],
                               data_file=SAMPLE)
            assert result.code("DATA_END") == 250, result.transcript
            delivered = sort_out(sink)
    finally:
        milter.stop()
    check_split_delivery(delivered)
