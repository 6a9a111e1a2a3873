"""SMTP in with swaks and smtplib: extensions, relay control, smuggling, limits, the milter
chain at each stage, and the queue behind the 250."""
from __future__ import annotations

import smtplib
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.policy.matching import parse_network_pattern
from mta.gateway.listener import ThreadedListener
from mta.chain.session import ChainMember, ChainSession
from mta.chain.client import MilterEndpoint
from mta.queue.spool import Queue
from mta.smtp_in.server import GatewayHandler, SmtpSettings
from tests.harness.ports import free_port
from tests.harness.swaks import run_swaks

pytestmark = pytest.mark.integration

LOOPBACK_NET = (parse_network_pattern("127.0.0.0/8"),)


def settings(**kw: object) -> SmtpSettings:
    base = dict(hostname="mx.mailmoat.test", internal_networks=LOOPBACK_NET,
                relay_domains=("example.jp",), xclient_networks=LOOPBACK_NET,
                max_message_size=200_000, max_recipients=3)
    base.update(kw)
    return SmtpSettings(**base)  # type: ignore[arg-type]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[int, Queue]]:
    queue = Queue(tmp_path / "spool")
    port = free_port()
    with ThreadedListener(GatewayHandler(settings(), queue), "127.0.0.1", port):
        yield port, queue


def outside(port: int, rcpt: str | list[str], **kw: object):  # type: ignore[no-untyped-def]
    return run_swaks(port, mail_from="a@outside.example", rcpt=rcpt,
                     xclient_addr="192.0.2.9", **kw)  # type: ignore[arg-type]


def test_ehlo_advertises_the_extensions(gateway: tuple[int, Queue]) -> None:
    port, _ = gateway
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        for extension in ("size", "pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes"):
            assert client.has_extn(extension), extension
        assert client.esmtp_features["size"] == "200000"


def test_accepted_mail_is_on_disk_before_the_250(gateway: tuple[int, Queue]) -> None:
    port, queue = gateway
    result = outside(port, "taro@example.jp", header=["Subject: hello"], extra_args=["--pipeline"])
    line = result.reply_by_stage["DATA_END"]
    assert line.startswith("250 2.0.0 Ok: queued as "), result.transcript
    queue_id = line.rsplit(" ", 1)[1]
    envelope = queue.envelope(queue_id)
    assert envelope.client_ip == "192.0.2.9" and envelope.sender == "a@outside.example"
    assert b"Subject: hello" in queue.message(queue_id)


@pytest.mark.parametrize("rcpt", ["victim@elsewhere.example", "victim%elsewhere.example@example.jp",
                                  "elsewhere.example!victim@example.jp",
                                  "\"victim@elsewhere.example\"@example.jp",
                                  "victim@example.jp.", "@example.jp:victim@elsewhere.example"])
def test_open_relay_tricks_are_refused_from_outside(gateway: tuple[int, Queue], rcpt: str) -> None:
    port, queue = gateway
    result = outside(port, rcpt)
    code = result.code("RCPT")
    assert code is not None and code >= 500, result.transcript
    assert queue.entries() == []


def test_internal_clients_may_relay(gateway: tuple[int, Queue]) -> None:
    port, _ = gateway
    result = run_swaks(port, mail_from="app@example.jp", rcpt="customer@elsewhere.example")
    assert result.code("DATA_END") == 250, result.transcript


def _raw_session(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"EHLO c.example\r\nMAIL FROM:<a@example.jp>\r\nRCPT TO:<t@example.jp>\r\n"
                     b"DATA\r\n" + data + b"QUIT\r\n")
        received = b""
        while b"221" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        return received


@pytest.mark.parametrize("payload", [
    b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<x@evil.example>\r\n.\r\n",     # LF.LF
    b"Subject: a\r\n\r\nbody\r\n.\nRCPT TO:<x@evil.example>\r\n.\r\n",     # CRLF.LF
    b"Subject: a\r\n\r\nbody\n.\r\nDATA\r\n.\r\n",                           # LF.CRLF
    b"Subject: a\r\n\r\nbody\r.\r\nQUIT\r\n.\r\n",                           # CR.CRLF
])
def test_smtp_smuggling_variants_are_refused(gateway: tuple[int, Queue], payload: bytes) -> None:
    port, queue = gateway
    replies = _raw_session(port, payload)
    assert b"554 5.6.0 Message refused: bare LF or CR" in replies, replies
    assert queue.entries() == []


def test_size_and_recipient_limits(gateway: tuple[int, Queue]) -> None:
    port, queue = gateway
    big = outside(port, "taro@example.jp", body=("x" * 98 + "\r\n") * 2500)
    assert big.final_reply_code == 552, big.transcript
    many = outside(port, [f"u{i}@example.jp" for i in range(5)])
    assert [r[:3] for r in many.replies("RCPT")] == ["250", "250", "250", "452", "452"]


def test_milter_verdicts_at_each_stage(tmp_path: Path, action_milter: int) -> None:
    queue = Queue(tmp_path / "spool")
    port = free_port()
    chain = lambda: ChainSession([ChainMember(MilterEndpoint(  # noqa: E731
        "action", f"inet:127.0.0.1:{action_milter}"))])
    with ThreadedListener(GatewayHandler(settings(), queue, chain), "127.0.0.1", port):
        refused = outside(port, ["reject-me@example.jp", "taro@example.jp", "gone@example.jp"],
                          header=["Subject: original", "X-Remove-Me: x"])
    assert refused.replies("RCPT")[0] == "550 5.7.1 No such user here"
    queue_id = refused.reply_by_stage["DATA_END"].rsplit(" ", 1)[1]
    envelope = queue.envelope(queue_id)
    stored = queue.message(queue_id)
    assert b"Subject: changed subject" in stored and b"X-Remove-Me" not in stored
    assert stored.endswith(b"\r\n\r\nreplaced body\r\n")
    assert envelope.sender == "new-sender@example.jp"
    assert [r.address for r in envelope.recipients] == ["taro@example.jp", "added@example.jp",
                                                        "added-par@example.jp"]
    assert envelope.hold_reason == "held for review"  # quarantine = our hold queue


def test_a_full_spool_answers_452_and_never_250(tiny_disk: Path) -> None:
    queue = Queue(tiny_disk / "spool")
    port = free_port()
    with ThreadedListener(GatewayHandler(settings(), queue), "127.0.0.1", port):
        result = outside(port, "taro@example.jp", body=("y" * 98 + "\r\n") * 1000)
        small = outside(port, "taro@example.jp", body="small\r\n")
    assert result.reply_by_stage["DATA_END"] == "452 4.3.1 Insufficient system storage"
    assert small.code("DATA_END") == 250  # the failed attempt left nothing behind
    assert len(queue.entries()) == 1


def test_connection_limits_per_ip_and_in_total(tmp_path: Path) -> None:
    port = free_port()
    handler = GatewayHandler(settings(max_connections=3, max_connections_per_ip=2),
                             Queue(tmp_path / "spool"))
    with ThreadedListener(handler, "127.0.0.1", port):
        first, second = (socket.create_connection(("127.0.0.1", port), timeout=5)
                         for _ in range(2))
        assert first.recv(100).startswith(b"220 ")
        assert second.recv(100).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            assert third.recv(200) == (b"421 4.7.0 mx.mailmoat.test Error: too many "
                                       b"connections from 127.0.0.1\r\n")
        first.close()
        for _ in range(50):  # the server notices the close asynchronously
            if sum(handler.connections.values()) < 2:
                break
            threading.Event().wait(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as again:
            assert again.recv(100).startswith(b"220 ")
        second.close()


def test_starttls_is_offered_with_a_certificate_and_works(tmp_path: Path) -> None:
    from mta.smtp_in.server import server_tls_context
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.mailmoat.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    queue = Queue(tmp_path / "spool")
    port = free_port()
    tls = settings(tls_context=server_tls_context(str(cert), str(key)))
    with ThreadedListener(GatewayHandler(tls, queue), "127.0.0.1", port):
        result = run_swaks(port, mail_from="a@outside.example", rcpt="taro@example.jp",
                           extra_args=["--tls"])
    assert "250-STARTTLS" in result.transcript
    assert "TLS started" in result.transcript, result.transcript
    assert result.code("DATA_END") == 250
    assert len(queue.entries()) == 1


def test_unknown_recipients_in_our_domains_are_refused(tmp_path: Path) -> None:
    from milters.core.policy.matching import parse_address_pattern
    known = tuple(parse_address_pattern(p) for p in ("taro@example.jp", "@sales.example.jp"))
    port = free_port()
    with ThreadedListener(GatewayHandler(settings(valid_recipients=known),
                                         Queue(tmp_path / "spool")), "127.0.0.1", port):
        result = outside(port, ["taro@example.jp", "nobody@example.jp", "anyone@sales.example.jp"])
    assert result.replies("RCPT") == [
        "250 2.1.5 Ok", "550 5.1.1 <nobody@example.jp>: Recipient address rejected: User unknown",
        "250 2.1.5 Ok"]
