"""Headers a hostile sender can write never cost a milter connection or hang the MTA: a
200 KB Subject, a 135 KB To, a continuation line that lost its indentation, a header name
that is not UTF-8, a NUL. Against our own milters (libmilter via pymilter), through our
client, through `serve` over SMTP and through `scan`."""
from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from milters.core.verdict import Action
from mta.chain.client import MilterClient, MilterEndpoint
from tests.harness.milter_proc import ROOT, MilterProcess
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

POLICY = "internal_networks: [127.0.0.0/8]\ndefaults: {attachments: encrypt}\n"
BAD_NAME = b"X-Bad\xff\xfeName"
# (what, header lines): each one, alone, dropped the milter connection or hung the MTA.
HOSTILE: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("200 KB Subject", [(b"Subject", b"s" * 200_000)]),
    ("135 KB To", [(b"To", ", ".join(f"u{i}@customer.example" for i in range(6000))
                    .encode()[:135_000])]),
    ("exactly the limit", [(b"Subject", b"e" * (65535 - len("Subject") - 2))]),
    ("one byte over", [(b"Subject", b"o" * (65535 - len("Subject") - 1))]),
    ("continuation without indentation", [(b"y" * 70_000, b"")]),
    ("name not UTF-8", [(BAD_NAME, b"caf\xe9")]),
    ("NUL in a value", [(b"X-Nul", b"a\0b")]),
]


def _client(milter: MilterProcess) -> MilterClient:
    # A short content timeout: a milter that went silent fails the test in seconds, not in
    # the default 300 s.
    client = MilterClient(MilterEndpoint(milter.name, milter.socket_spec, command_timeout=10,
                                         content_timeout=10))
    client.open()
    return client


@pytest.fixture(scope="module")
def milters(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("limits")
    (work / "policy.yaml").write_text(POLICY)
    config = work / "config.yaml"
    config.write_text("gateway: {hostname: mx.example.jp}\nstore: memory://\n"
                      "policy: policy.yaml\n")
    started = [MilterProcess(name, config, work).start() for name in ("attachments",
                                                                       "neutralize")]
    yield started
    for milter in started:
        milter.stop()


@pytest.mark.parametrize("what,headers", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_every_hostile_header_gets_an_end_of_message_reply(
        milters: list[MilterProcess], what: str, headers: list[tuple[bytes, bytes]]) -> None:
    for milter in milters:
        client = _client(milter)
        try:
            client.connect("client.example", "127.0.0.1", 40000)
            client.helo("client.example")
            client.mail("a@example.jp", macros={"i": "QIDLIMITS"})
            client.rcpt("b@customer.example")
            client.data()
            for name, value in [(b"From", b"a@example.jp"), *headers]:
                client.header(name.decode("utf-8", "surrogateescape"),
                              value.decode("utf-8", "surrogateescape"))
            client.end_of_headers()
            client.body(b"hello\r\n")
            outcome = client.end_of_message()  # MilterProtocolError if dropped or silent
            # The same connection still works: nothing was left half-read.
            client.mail("a@example.jp")
        finally:
            client.close()
        if outcome.verdict.action is Action.TEMPFAIL and milter.name == "attachments":
            # Fail closed: a field name that is not one makes the header section one the
            # attachments milter cannot trust, so the whole message goes into the ZIP, which
            # needs the re-injection listener this test does not run: its 451 says so.
            assert "attachments_unparsable" in milter.log_text(), (what, milter.log_text())
            assert "re-injection" in str(outcome.verdict.reply) + milter.log_text()
        else:
            assert outcome.verdict.action in (Action.CONTINUE, Action.ACCEPT), (what,
                                                                                milter.name)
        assert "Traceback" not in milter.log_text() and "UnicodeDecodeError" not in \
            milter.log_text(), milter.log_text()[-2000:]


def _eml(headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"From: a@example.jp", b"To: taro@example.jp", b"Message-ID: <m@example.jp>"]
    lines += [name + (b": " + value if value else b"") for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\nhello\r\n"


def test_through_serve_every_hostile_header_gets_a_defined_reply(tmp_path: Path) -> None:
    milters = ("milters:\n  - {name: attachments, content_timeout: 20s}\n"
               "  - {name: neutralize, content_timeout: 20s}\n")
    gateway = Serve(tmp_path, policy=POLICY, milters=milters).start()
    replies = {}
    try:
        for what, headers in HOSTILE:
            with smtplib.SMTP("127.0.0.1", gateway.port, timeout=90) as client:
                client.ehlo("client.example")
                client.mail("a@example.jp")
                client.rcpt("taro@example.jp")
                # NUL cannot cross SMTP DATA through smtplib's str handling: bytes go as is.
                code, _ = client.data(_eml(headers))
                replies[what] = code
    finally:
        gateway.stop()
    log = gateway.text()
    assert replies == {what: 250 for what, _ in HOSTILE}, log[-3000:]
    assert "milter_failed" not in log and "Traceback" not in log, log[-3000:]
    truncated = re.findall(r"event=header_truncated milter=(\S+) queue_id=(\S+) name=(\S+) "
                           r"size=(\d+)", log)
    # name + value bytes; the header exactly at the limit (65533 + 2 NULs) is sent whole.
    sizes = {(name, int(size)) for milter, _, name, size in truncated if milter == "attachments"}
    assert {("Subject", 200_007), ("Subject", 65534), ("To", 135_002)} <= sizes
    assert ("Subject", 65533) not in sizes


def test_a_header_cut_for_the_milters_is_delivered_cut_so_nothing_hides_past_the_limit(
        tmp_path: Path) -> None:
    """An Authentication-Results naming our authserv-id only after 100 KB of comment: the
    milters see the first 64 KB (no id: not ours, not trusted); were the whole header then
    delivered, the next reader would find a forged verdict no milter judged. What is
    delivered is what the milters saw."""
    forged = b"(" + b"x" * 100_000 + b") mx.mailmoat.test; dmarc=pass header.from=example.jp"
    milters = "milters:\n  - {name: attachments, content_timeout: 20s}\n"
    gateway = Serve(tmp_path, policy=POLICY, milters=milters).start()
    try:
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=90) as client:
            client.ehlo("client.example")
            client.mail("a@example.jp")
            client.rcpt("taro@example.jp")
            code, _ = client.data(_eml([(b"Authentication-Results", forged)]))
        box = tmp_path / "maildir" / "taro@example.jp" / "new"
        deadline = time.monotonic() + 20
        while not (box.exists() and any(box.iterdir())):
            assert time.monotonic() < deadline, gateway.text()[-3000:]
            time.sleep(0.05)
    finally:
        gateway.stop()
    assert code == 250
    (delivered,) = [f.read_bytes() for f in box.iterdir()]
    assert b"x" * 60_000 in delivered  # the header's start is kept, as Postfix keeps it
    assert b"mx.mailmoat.test; dmarc=pass" not in delivered
    header = delivered.split(b"\r\n\r\n", 1)[0]
    field = header[header.index(b"Authentication-Results:"):].split(b"\r\n")[0]
    assert len(field) <= 65535
    assert "event=header_truncated milter=attachments" in gateway.text()


def test_scan_of_a_header_name_that_is_not_utf8_returns(tmp_path: Path) -> None:
    """It waited forever: pymilter failed on the name, libmilter then ignored the message."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "config.yaml"
    # A content timeout far below the subprocess's: without the fix the milter stays
    # silent and the scan reports the milter failed instead of accepting.
    config.write_text("gateway: {hostname: mx.example.jp}\nstore: memory://\n"
                      "milters: [{name: attachments, content_timeout: 15s},"
                      " {name: neutralize, content_timeout: 15s}]\npolicy: policy.yaml\n")
    sample = tmp_path / "bad-name.eml"
    sample.write_bytes(_eml([(BAD_NAME, b"v\xe9")]))
    done = subprocess.run([sys.executable, "-m", "mta.cli", "scan", str(sample), "--config",
                           str(config), "--user", "root", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "accept", report
    assert all(not m["details"] for m in report["milters"]), report["milters"]
    assert "UnicodeDecodeError" not in done.stderr, done.stderr[-2000:]
