"""Big messages through `serve`'s milter chain are streamed from the spool file, never held
whole in serve's memory (issue 13 section 4): a 20 MiB message through a milter that reads
every body byte, once untouched and once edited (a header added, the body replaced by a
bigger one), with serve's peak RSS watched from /proc."""
from __future__ import annotations

import base64
import hashlib
import random
import re
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.verdict import Action
from mta.chain.edits_apply import Transit
from mta.chain.message_text import MessageText
from mta.chain.session import ChainMember, ChainSession, connect_macros
from mta.chain.client import MilterEndpoint
from tests.harness.body_milter import replacement_body
from tests.harness.milter_proc import ROOT, MilterProcess
from tests.harness.ports import LOOPBACK, free_port, wait_for_port
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

BIG = 20 * 1024 * 1024
NEW_BODY = 21 * 1000 * 1000  # the edited message's new body: bigger than the old one
RECEIVED = re.compile(rb"\AReceived: from [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


@pytest.fixture
def body_milter(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The body-hashing milter on a free port; yields (port, its report file)."""
    port, report = free_port(), tmp_path / "body-milter.txt"
    report.touch()
    proc = subprocess.Popen([sys.executable, "-m", "tests.harness.body_milter",
                             f"inet:{port}@{LOOPBACK}", str(report)], cwd=ROOT,
                            stdout=subprocess.DEVNULL)
    try:
        wait_for_port(LOOPBACK, port, timeout=10)
        yield port, report
    finally:
        proc.terminate()
        proc.wait(10)


def message(size: int, name: str, extra: bytes = b"") -> bytes:
    """A MIME message of exactly `size` bytes: base64 lines, CRLF, a Message-ID `name`."""
    head = (b"From: <a@outside.example>\r\nTo: <taro@example.jp>\r\nSubject: big\r\n"
            b"Message-ID: <" + name.encode() + b"@test>\r\n" + extra +
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n")
    noise = random.Random(name).randbytes(size // 4 * 3)
    body = base64.encodebytes(noise).replace(b"\n", b"\r\n")[:size - len(head) - 2]
    body = body.rstrip(b"\r\n")
    return head + body + b"A" * (size - len(head) - len(body) - 2) + b"\r\n"


def send(port: int, raw: bytes) -> str:
    with smtplib.SMTP(LOOPBACK, port, timeout=120) as client:
        client.ehlo("client.example")
        client.mail("a@outside.example", [f"SIZE={len(raw)}"])
        client.rcpt("taro@example.jp")
        code, reply = client.data(raw)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def peak_kb(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in kB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def delivered(gateway: Serve, name: str) -> bytes:
    """The delivered copy with this Message-ID, without the lines delivery and our trace
    add on top (Return-Path, Delivered-To, Received)."""
    for path in (gateway.dir / "maildir" / "taro@example.jp" / "new").iterdir():
        raw = path.read_bytes()
        if f"Message-ID: <{name}@test>".encode() in raw[:4096]:
            assert raw.startswith(b"Return-Path: <a@outside.example>\r\n"
                                  b"Delivered-To: taro@example.jp\r\n")
            raw = raw.split(b"\r\n", 2)[2]
            found = RECEIVED.match(raw)
            assert found, raw[:300]
            return raw[found.end():]
    raise AssertionError(f"no delivered message {name}")


def milter_saw(report: Path, queue_id: str) -> tuple[str, int, int]:
    for line in report.read_text().splitlines():
        qid, digest, size, largest = line.split()
        if qid == queue_id:
            return digest, int(size), int(largest)
    raise AssertionError(f"the milter reported nothing for {queue_id}: {report.read_text()}")


def test_a_big_message_streams_through_the_chain_and_serve_stays_small(
        tmp_path: Path, body_milter: tuple[int, Path]) -> None:
    port, report = body_milter
    milters = f"milters:\n  - {{name: body, socket: \"inet:{LOOPBACK}:{port}\"}}\n"
    gateway = Serve(tmp_path, milters=milters).start()
    assert gateway.proc is not None
    plain = message(BIG, "plain")
    edited = message(BIG, "edited", b"X-Edit: yes\r\nX-Replace-Body: %d\r\n" % NEW_BODY)
    try:
        # One small message first: what serve allocates once (imports on first use, its
        # buffers) belongs to the baseline, not to the big messages.
        gateway.wait_log(r"event=serve_started")
        send(gateway.port, message(100_000, "warm-up"))
        gateway.wait_log(r"event=delivered ")
        before = peak_kb(gateway.proc.pid)
        plain_id = send(gateway.port, plain)
        edited_id = send(gateway.port, edited)
        after = peak_kb(gateway.proc.pid)
        for queue_id in (plain_id, edited_id):
            gateway.wait_log(rf"event=delivered queue_id={queue_id} ", timeout=120)
    finally:
        gateway.stop()
    growth = (after - before) * 1024
    # Before streaming serve read the message whole and copied its body (2x the message);
    # now only chunks and the connection's input buffer (1 MiB) are in memory.
    assert growth < BIG / 5, f"serve's peak RSS grew by {growth / 2**20:.1f} MiB"

    # The milter got every body byte, in chunks of at most 65535 bytes.
    body = plain.split(b"\r\n\r\n", 1)[1]
    assert milter_saw(report, plain_id) == (hashlib.sha256(body).hexdigest(), len(body), 65535)
    # Not edited: delivered byte for byte as sent.
    assert delivered(gateway, "plain") == plain
    # Edited: the header added at the end of the header, the body replaced as a whole.
    head, old_body = edited.split(b"\r\n\r\n", 1)
    digest, size, _ = milter_saw(report, edited_id)
    assert (digest, size) == (hashlib.sha256(old_body).hexdigest(), len(old_body))
    new_body = b"".join(replacement_body(NEW_BODY))
    assert len(new_body) == NEW_BODY
    assert delivered(gateway, "edited") == (head + b"\r\nX-Body-SHA256: " + digest.encode()
                                            + b"\r\n\r\n" + new_body)
    # Nothing the chain wrote is left behind in the spool's tmp/.
    assert list((tmp_path / "var" / "spool" / "tmp").iterdir()) == []


def test_a_milter_that_skips_headers_and_body_costs_no_read_of_the_message(
        tmp_path: Path) -> None:
    """ratelimit negotiates NOHDRS|NOBODY: the chain must not even open the message's file
    for it. The text here names a file that does not exist: any read would raise."""
    (tmp_path / "policy.yaml").write_text(
        "ratelimit:\n  exempt_internal: false\n  limits:\n"
        "    - {name: m, key: client_ip, per: message, rate: 100/min, burst: 100}\n")
    config = tmp_path / "milter.yaml"
    config.write_text("store: sqlite:///state.db\npolicy: policy.yaml\n")
    missing = MessageText(path=str(tmp_path / "no-such-file.msg"), size=45_000_000)
    with MilterProcess("ratelimit", config, tmp_path, unix_path=tmp_path / "rl.sock") as milter:
        chain = ChainSession([ChainMember(MilterEndpoint("ratelimit", milter.socket_spec))])
        try:
            chain.connect("[192.0.2.9]", "192.0.2.9", 40000, socket.AF_INET,
                          connect_macros("mx.mailmoat.test", "192.0.2.9"))
            chain.helo("client.example")
            assert not chain.mail("a@outside.example", macros={"i": "Q1"}).ends_transaction
            assert not chain.rcpt("taro@example.jp", macros={"i": "Q1"}).ends_transaction
            transit = Transit(missing, "a@outside.example", [("taro@example.jp", None)])
            verdict, out = chain.message(transit, {"i": "Q1"})
        finally:
            chain.close()
    assert verdict.action is Action.CONTINUE and chain.results[0].error is None
    assert out.text is missing
