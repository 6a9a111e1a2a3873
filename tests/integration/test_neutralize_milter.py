"""The neutralize milter behind a private Postfix and behind our own MTA, with the auth milter
before it and a real Knot DNS on loopback: a DMARC-failing sender's mail arrives with its
links dead, its documents flat and a note; a DMARC-passing sender's arrives untouched; a
PPAP password ZIP is refused with the team's reply."""
from __future__ import annotations

import base64
import email
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import pytest

from milters.neutralize.logic import MARK_HEADER
from tests.harness import documents as docs
from tests.harness.dns_server import KnotServer
from tests.harness.milter_proc import MilterProcess
from tests.harness.pdf_inspect import inspect_pdf
from tests.harness.postfix import PostfixInstance, postfix_instance
from tests.harness.sink import SmtpSink
from tests.harness.swaks import SwaksResult, run_swaks
from tests.integration.auth_world import AUTHSERV_ID, GOOD_IP, STRANGER_IP, make_keys, zones
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

ENCRYPTED_REPLY = "550 5.7.1 Password ZIPs are refused; please use the upload portal"
POLICY = f"""\
internal_networks: [127.0.0.0/8]
auth:
  dmarc:
    actions: {{reject: tag, quarantine: tag, none: tag}}
neutralize:
  trusted_domains: [pass.test]
  encrypted_reply: "{ENCRYPTED_REPLY}"
  on_failure: drop
rules:
  - name: dmarc-not-passing
    when: {{auth: {{dmarc: [fail, none, permerror, temperror]}}}}
    then: {{neutralize: neutralize}}
defaults:
  neutralize: pass
"""


def config_text(nameserver: str) -> str:
    return (f"gateway: {{hostname: {AUTHSERV_ID}}}\nstore: memory://\npolicy: policy.yaml\n"
            f"dns: {{nameservers: [\"{nameserver}\"], timeout: 2s}}\n")


@dataclass
class World:
    dns: KnotServer
    workdir: Path
    pdf: Path
    docx: Path
    locked_zip: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("neutralize")
    keys = make_keys(workdir / "keys")
    pdf = docs.pdf(workdir / "in.pdf", 2, javascript=True, link=True)
    docx = docs.docx(workdir / "in.docx", ["御見積書", "金額"], pages=2)
    locked = docs.zip_zipcrypto_7z(workdir / "locked.zip", {"見積書.xlsx": b"x" * 500}, "pw")
    with KnotServer(zones(keys), workdir) as dns:
        yield World(dns, workdir, pdf, docx, locked)


def phishing(world: World, sender: str, files: list[tuple[str, Path]]) -> bytes:
    message = EmailMessage()
    message["From"] = f"Support <{sender}>"
    message["To"] = "taro@example.jp"
    message["Subject"] = "Your account"
    message["Message-ID"] = f"<{abs(hash((sender, len(files))))}@x>"
    message["Date"] = "Sun, 29 Nov 2026 10:00:00 +0900"
    message.set_content("Log in at https://login.attacker.test/verify now.\n")
    message.add_alternative('<p>Log in <a href="https://login.attacker.test/verify">'
                            'https://www.pass.test/login</a><script>steal()</script>'
                            '<img src="https://track.attacker.test/o.gif"></p>', subtype="html")
    for name, path in files:
        message.add_attachment(path.read_bytes(), maintype="application",
                               subtype="octet-stream", filename=name)
    return bytes(message).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def start_milters(workdir: Path, nameserver: str) -> list[MilterProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "policy.yaml").write_text(POLICY)
    config = workdir / "config.yaml"
    config.write_text(config_text(nameserver))
    return [MilterProcess(name, config, workdir).start() for name in ("auth", "neutralize")]


@dataclass
class Gateway:
    postfix: PostfixInstance
    sink: SmtpSink
    workdir: Path

    def send(self, raw: bytes, client: str, mail_from: str) -> SwaksResult:
        path = self.workdir / "outgoing.eml"
        path.write_bytes(raw)
        return run_swaks(self.postfix.smtp_port, mail_from=mail_from, rcpt="taro@example.jp",
                         xclient_addr=client, helo="mail.example.test", data_file=path)


@pytest.fixture(scope="module")
def gateway(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("neutralize-postfix")
    milters = start_milters(workdir, world.dns.nameserver)
    try:
        with SmtpSink() as sink, postfix_instance(
                workdir, relay_port=sink.port,
                smtpd_milters=" ".join(m.socket_spec for m in milters),
                extra={"local_header_rewrite_clients": "", "milter_command_timeout": "120s",
                       "milter_content_timeout": "300s"}) as postfix:
            yield Gateway(postfix, sink, workdir)
    finally:
        for milter in milters:
            milter.stop()


def delivered(sink: SmtpSink, before: int) -> EmailMessage:
    message = email.message_from_bytes(sink.wait_for(before + 1, timeout=60)[before].data,
                                       policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    return message


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.live: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "action") or (name == "src" and not (value or "").startswith(
                    "cid:")) or name.startswith("on") or tag == "script":
                self.live.append(f"{tag}@{name}")


def named_parts(message: EmailMessage) -> dict[str, object]:
    """Every part with a file name, inline ones (the note) included."""
    return {p.get_filename(): p.get_content() for p in message.walk() if p.get_filename()}


def assert_neutralized(message: EmailMessage, tmp_path: Path) -> None:
    assert message[MARK_HEADER].startswith("links=")
    assert "rule=dmarc-not-passing" in message[MARK_HEADER]
    html = message.get_body(("html",)).get_content()
    parser = _Links()
    parser.feed(html)
    assert parser.live == [] and "<script" not in html
    assert "[hxxps://login[.]attacker[.]test/verify]" in html
    plain = message.get_body(("plain",)).get_content()
    assert "hxxps://login[.]attacker[.]test/verify" in plain
    files = named_parts(message)
    assert sorted(files) == ["contract.pdf", "mailmoat-note.txt", "見積書.pdf"]
    for name, pages in (("contract.pdf", 2), ("見積書.pdf", 2)):
        (tmp_path / "check.pdf").write_bytes(files[name])
        facts = inspect_pdf(tmp_path / "check.pdf")
        assert facts.is_flat and facts.pages == pages, (name, facts.details)
    assert "shows www.pass.test but leads to login.attacker.test" in files["mailmoat-note.txt"]


def test_dmarc_failing_sender_is_neutralized_behind_postfix(world: World, gateway: Gateway,
                                                            tmp_path: Path) -> None:
    raw = phishing(world, "support@none.test", [("contract.pdf", world.pdf),
                                                ("見積書.docx", world.docx)])
    before = len(gateway.sink.messages)
    result = gateway.send(raw, STRANGER_IP, "support@none.test")
    assert result.code("DATA_END") == 250, result.transcript
    message = delivered(gateway.sink, before)
    assert "dmarc=fail" in str(message["Authentication-Results"])
    assert_neutralized(message, tmp_path)


def test_dmarc_passing_trusted_sender_arrives_untouched(world: World, gateway: Gateway) -> None:
    raw = phishing(world, "ceo@pass.test", [("contract.pdf", world.pdf)])
    raw = raw.replace(b"Subject:", f"{MARK_HEADER}: links=0; rule=forged\r\nSubject:".encode())
    before = len(gateway.sink.messages)
    result = gateway.send(raw, GOOD_IP, "ceo@pass.test")
    assert result.code("DATA_END") == 250, result.transcript
    message = delivered(gateway.sink, before)
    assert "dmarc=pass" in str(message["Authentication-Results"])
    assert MARK_HEADER not in message  # the forged marker is gone, no real one added
    assert named_parts(message) == {"contract.pdf": world.pdf.read_bytes()}
    assert '<a href="https://login.attacker.test/verify">' in \
        message.get_body(("html",)).get_content()


def test_ppap_zip_from_a_failing_sender_is_refused(world: World, gateway: Gateway) -> None:
    raw = phishing(world, "support@none.test", [("見積書.zip", world.locked_zip)])
    result = gateway.send(raw, STRANGER_IP, "support@none.test")
    assert result.reply_by_stage["DATA_END"] == ENCRYPTED_REPLY


def test_our_mta_neutralizes_the_same_way(world: World, gateway: Gateway,
                                          tmp_path: Path) -> None:
    dns_line = config_text(world.dns.nameserver).split("policy.yaml\n")[1]
    with SmtpSink() as sink:
        serve = Serve(tmp_path, policy=POLICY, relay=f"smtp:[127.0.0.1]:{sink.port}",
                      milters="milters: [{name: auth}, {name: neutralize}]\n" + dns_line)
        serve.config.write_text(serve.config.read_text().replace(
            "hostname: mx.mailmoat.test", f"hostname: {AUTHSERV_ID}"))
        serve.start()
        try:
            raw = phishing(world, "support@none.test", [("contract.pdf", world.pdf),
                                                        ("見積書.docx", world.docx)])
            path = tmp_path / "case.eml"
            path.write_bytes(raw)
            result = run_swaks(serve.port, mail_from="support@none.test",
                               rcpt="taro@example.jp", xclient_addr=STRANGER_IP,
                               helo="mail.example.test", data_file=path)
            assert result.code("DATA_END") == 250, result.transcript
            assert_neutralized(delivered(sink, 0), tmp_path)
            path.write_bytes(phishing(world, "support@none.test",
                                      [("見積書.zip", world.locked_zip)]))
            refused = run_swaks(serve.port, mail_from="support@none.test",
                                rcpt="taro@example.jp", xclient_addr=STRANGER_IP,
                                helo="mail.example.test", data_file=path)
            assert refused.reply_by_stage["DATA_END"] == ENCRYPTED_REPLY
        finally:
            serve.stop()


def test_a_slow_conversion_keeps_postfix_waiting_with_progress(world: World,
                                                              tmp_path: Path) -> None:
    """Postfix gives a milter milter_content_timeout per reply; the milter sends `progress`
    every 10 s while it converts, so a 25 s conversion outlasts a 15 s timeout."""
    slow = tmp_path / "slow-soffice"
    slow.write_text("#!/bin/sh\nsleep 25\nexec soffice \"$@\"\n")
    slow.chmod(0o755)
    (tmp_path / "policy.yaml").write_text(
        f"internal_networks: [127.0.0.0/8]\nneutralize: {{soffice: {slow}, on_failure: drop}}\n"
        "rules:\n  - {name: all, when: {direction: inbound}, then: {neutralize: neutralize}}\n")
    config = tmp_path / "config.yaml"
    config.write_text(config_text(world.dns.nameserver))
    milter = MilterProcess("neutralize", config, tmp_path).start()
    try:
        with SmtpSink() as sink, postfix_instance(
                tmp_path, relay_port=sink.port, smtpd_milters=milter.socket_spec,
                extra={"milter_content_timeout": "15s",
                       "milter_default_action": "tempfail"}) as postfix:
            gateway = Gateway(postfix, sink, tmp_path)
            raw = phishing(world, "support@none.test", [("見積書.docx", world.docx)])
            result = gateway.send(raw, STRANGER_IP, "support@none.test")
            assert result.code("DATA_END") == 250, result.transcript
            files = named_parts(delivered(sink, 0))
            assert "見積書.pdf" in files
    finally:
        milter.stop()


def test_nested_links_reports_and_broken_files_behind_postfix(world: World, gateway: Gateway,
                                                              tmp_path: Path) -> None:
    """The hostile kinds of issue 14 in one message through the real milter behind Postfix:
    redirector URLs carrying live ones (plain and percent-encoded), a feedback report's
    Reported-Uri, a delivery status, a text file, a part in an unknown charset, and a PDF
    that is garbage after its header. Nothing live arrives (parsed, not grepped), the
    broken file is dropped with its reason (not a tempfail), the note counts the links."""
    from tests.harness.broken_files import garbage_pdf
    from tests.harness.live_urls import live_urls
    nested = ("Go https://r.attacker.test/r?u=http://evil.attacker.test/x or\r\n"
              "https://r.attacker.test/r?u=https%3A%2F%2Fevil.attacker.test%2Fy\r\n")
    pdf = garbage_pdf(tmp_path / "g.pdf").read_bytes()
    raw = (b"From: Support <support@none.test>\r\nTo: taro@example.jp\r\nSubject: report\r\n"
           b"Message-ID: <nested@none.test>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0900\r\n"
           b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
           b"--B\r\nContent-Type: text/plain\r\n\r\n" + nested.encode() +
           b"\r\n--B\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
           b"Version: 1\r\nReported-Uri: https://evil.attacker.test/p?u=www.evil.attacker.test"
           b"\r\n\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; "
           b"mx.none.test\r\n\r\nFinal-Recipient: rfc822; a@b.test\r\nAction: failed\r\n"
           b"Status: 5.0.0\r\nDiagnostic-Code: smtp; see https://evil.attacker.test/d\r\n"
           b"\r\n--B\r\nContent-Type: text/plain; charset=x-klingon\r\n\r\n"
           b"http://evil.attacker.test/k \xff\xfe\r\n"
           b'\r\n--B\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; '
           b'filename="urls.txt"\r\n\r\n' + nested.encode() +
           b'\r\n--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; '
           b'filename="invoice.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
           + base64.encodebytes(pdf).replace(b"\n", b"\r\n") + b"\r\n--B--\r\n")
    assert len(live_urls(raw)) >= 8
    before = len(gateway.sink.messages)
    result = gateway.send(raw, STRANGER_IP, "support@none.test")
    assert result.code("DATA_END") == 250, result.transcript
    out = gateway.sink.wait_for(before + 1, timeout=60)[before].data
    assert live_urls(out) == []
    message = email.message_from_bytes(out, policy=email_policy.default)
    types = [p.get_content_type() for p in message.walk()]
    assert "message/feedback-report" in types and "message/delivery-status" in types
    files = named_parts(message)
    assert "invoice.pdf" not in files and "urls.txt" in files
    note = files["mailmoat-note.txt"]
    assert "invoice.pdf was removed: it cannot be read (not a PDF pdfium can open" in note
    links = int(str(message[MARK_HEADER]).split("links=")[1].split(";")[0])
    assert links >= 10 and f"{links} link(s) were disabled" in note
