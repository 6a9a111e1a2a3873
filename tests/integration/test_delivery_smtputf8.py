"""SMTPUTF8 on the way out (RFC 6531/6532): mail received with SMTPUTF8 goes to a next hop that
offers it with SMTPUTF8; to one that does not, a message that needs it (a non-ASCII address or
header) bounces with 5.6.7 at once, never retried; one that only asked for it goes out plain
(Postfix's rule)."""
from __future__ import annotations

import email
import smtplib
import socket
import threading
from email import policy
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.config import QueueSettings
from mta.delivery.queue_run import deliver_due
from mta.delivery.relay import SmtpRelay
from mta.delivery.routing import Router
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.sink import SmtpSink
from tests.integration.test_delivery_failures import OPEN_POLICY
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

SETTINGS = QueueSettings(retry=(60.0, 300.0), max_age=3600.0)
T0 = 1_800_000_000.0
ASCII_BODY = b"From: a@outside.example\r\nSubject: plain\r\n\r\nbody\r\n"
UTF8_HEADER = "From: 送信者@outside.example\r\nSubject: 件名\r\n\r\n本文\r\n".encode()


@pytest.fixture
def hops() -> Iterator[tuple[SmtpSink, SmtpSink]]:
    """A next hop that offers SMTPUTF8 (the default route) and one that does not."""
    with SmtpSink() as modern, SmtpSink(smtputf8=False) as old:
        yield modern, old


@pytest.fixture
def serve(tmp_path: Path, hops: tuple[SmtpSink, SmtpSink]) -> Iterator[Serve]:
    modern, old = hops
    gateway = Serve(tmp_path, policy=OPEN_POLICY)
    text = gateway.config.read_text()
    text = text.replace("relay_domains: [example.jp]", "relay_domains: [example.jp, old.example]")
    text = text.replace('relay: {default: "maildir:maildir"}',
                        f'relay: {{default: "smtp:[127.0.0.1]:{modern.port}", routes: '
                        f'{{old.example: "smtp:[127.0.0.1]:{old.port}"}}}}')
    gateway.config.write_text(text)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def send(serve: Serve, sender: str, rcpt: str, content: bytes, utf8: bool = True) -> str:
    """One message over SMTP (MAIL ... SMTPUTF8 when `utf8`); its queue ID."""
    with smtplib.SMTP("127.0.0.1", serve.port, timeout=30) as client:
        client.ehlo("client.outside.example")
        client.docmd("XCLIENT", "ADDR=192.0.2.44")
        client.ehlo("client.outside.example")
        client.mail(sender, ["SMTPUTF8"] if utf8 else [])
        code, text = client.rcpt(rcpt)
        assert code == 250, text
        code, text = client.data(content)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


def test_smtputf8_is_passed_on_to_a_next_hop_that_offers_it(
        serve: Serve, hops: tuple[SmtpSink, SmtpSink]) -> None:
    modern, _ = hops
    send(serve, "送信者@outside.example", "太郎@example.jp", UTF8_HEADER)
    [got] = modern.wait_for(1)
    assert got.mail_from == "送信者@outside.example" and got.rcpt_tos == ("太郎@example.jp",)
    assert "SMTPUTF8" in got.mail_options
    assert "Subject: 件名".encode() in got.data


@pytest.mark.parametrize("sender, rcpt, content", [
    ("送信者@outside.example", "jiro@old.example", ASCII_BODY),  # the sender needs it
    ("a@outside.example", "次郎@old.example", ASCII_BODY),  # the recipient
    ("a@outside.example", "jiro@old.example", UTF8_HEADER),  # a header
], ids=["sender", "recipient", "header"])
def test_a_message_that_needs_smtputf8_bounces_5_6_7_from_a_next_hop_without_it(
        serve: Serve, hops: tuple[SmtpSink, SmtpSink], sender: str, rcpt: str,
        content: bytes) -> None:
    modern, old = hops
    queue_id = send(serve, sender, rcpt, content)
    serve.wait_log(rf"event=bounced queue_id={queue_id} to=\"?{rcpt}\"? reply=\"554 5.6.7 "
                   rf"SMTPUTF8 is required, but was not offered by host 127.0.0.1:{old.port}\" "
                   rf"attempt=1")
    serve.wait_log(rf"event=removed queue_id={queue_id}")  # bounced at once: no retry
    [notice] = modern.wait_for(1)  # the bounce, to the sender (default route)
    assert notice.mail_from == "<>" and notice.rcpt_tos == (sender,)
    report = email.message_from_bytes(notice.data, policy=policy.default)
    status = report.get_payload()[1]
    assert status.get_content_type() in ("message/delivery-status",
                                         "message/global-delivery-status")
    assert "\nStatus: 5.6.7" in status.as_string()
    assert "delivery_error" not in serve.text()
    assert old.messages == [] and old.refusals == []  # nothing was sent to it at all


def test_an_all_ascii_message_that_asked_for_smtputf8_goes_out_without_it(
        serve: Serve, hops: tuple[SmtpSink, SmtpSink]) -> None:
    _, old = hops
    send(serve, "a@outside.example", "jiro@old.example", ASCII_BODY)
    [got] = old.wait_for(1)
    assert got.mail_options == () and got.rcpt_tos == ("jiro@old.example",)


def test_mail_without_smtputf8_is_sent_without_it(serve: Serve,
                                                  hops: tuple[SmtpSink, SmtpSink]) -> None:
    modern, _ = hops
    send(serve, "a@outside.example", "taro@example.jp", ASCII_BODY, utf8=False)
    [got] = modern.wait_for(1)
    assert got.mail_options == ()


# -- the pipelined path (aiosmtpd does not offer PIPELINING) -----------------------------------
def pipelining_utf8_hop() -> tuple[int, list[bytes], threading.Thread]:
    """One session with a next hop that offers PIPELINING and SMTPUTF8; records the raw
    command lines."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        reader = conn.makefile("rb")
        conn.sendall(b"220 hop ESMTP\r\n")
        reader.readline()
        conn.sendall(b"250-hop\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
        seen.extend(reader.readline() for _ in range(3))  # MAIL, RCPT, DATA together
        conn.sendall(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
        while (line := reader.readline()) not in (b".\r\n", b""):
            pass
        conn.sendall(b"250 queued\r\n")
        while (line := reader.readline().upper()) not in (b"", b"QUIT\r\n"):
            conn.sendall(b"250 ok\r\n")
        conn.sendall(b"221 bye\r\n")
        conn.close()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], seen, thread


def test_a_pipelined_envelope_carries_smtputf8_in_utf_8(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    queue.enqueue(UTF8_HEADER, Envelope(new_queue_id(T0), "送信者@outside.example",
                                        [RecipientState("太郎@example.jp")], received_at=T0,
                                        extra={"smtputf8": "yes"}))
    port, seen, thread = pipelining_utf8_hop()
    relay = SmtpRelay("127.0.0.1", port, timeout=10)
    deliver_due(queue, Router(relay, {}), SETTINGS, "mx", now=T0)
    relay.close_idle(everything=True)
    thread.join(10)
    assert seen == ["MAIL FROM:<送信者@outside.example> SMTPUTF8\r\n".encode(),
                    "RCPT TO:<太郎@example.jp>\r\n".encode(), b"DATA\r\n"]
    assert queue.entries() == []


