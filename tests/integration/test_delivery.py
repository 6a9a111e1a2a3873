"""Delivery from the queue: relay to a next hop, Maildir, retries on the schedule, RFC 3464
bounces for 5xx and for mail past its maximum age, none for the null sender."""
from __future__ import annotations

import email
import socket
import threading
from email import policy
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.config import QueueSettings
from mta.delivery.queue_run import deliver_due
from mta.delivery.maildir import MaildirDelivery
from mta.delivery.relay import SmtpRelay
from mta.delivery.routing import Router
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.ports import free_port
from tests.harness.sink import SmtpSink

pytestmark = pytest.mark.integration

RAW = b"From: a@outside.example\r\nSubject: hello\r\n\r\nbody\r\n"
SETTINGS = QueueSettings(retry=(60.0, 300.0), max_age=3600.0)
T0 = 1_800_000_000.0


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


def enqueue(queue: Queue, rcpts: list[str], sender: str = "a@outside.example") -> str:
    return queue.enqueue(RAW, Envelope(new_queue_id(T0), sender,
                                       [RecipientState(r) for r in rcpts], received_at=T0))


def test_relay_delivers_and_removes(tmp_path: Path, sink: SmtpSink) -> None:
    queue = Queue(tmp_path)
    enqueue(queue, ["taro@example.jp", "hanako@example.jp"])
    router = Router(SmtpRelay("127.0.0.1", sink.port, helo="mx.mailmoat.test"), {})
    assert deliver_due(queue, router, SETTINGS, "mx.mailmoat.test", now=T0) == 1
    [got] = sink.wait_for(1, timeout=10)
    assert sorted(got.rcpt_tos) == ["hanako@example.jp", "taro@example.jp"]
    assert got.data.replace(b"\r\n", b"\n") == RAW.replace(b"\r\n", b"\n")
    assert queue.entries() == []


def test_temporary_failure_retries_on_schedule(tmp_path: Path, sink: SmtpSink) -> None:
    queue = Queue(tmp_path)
    queue_id = enqueue(queue, ["taro@example.jp"])
    router = Router(SmtpRelay("127.0.0.1", sink.port), {})
    sink.set_reply("RCPT", "451 4.3.0 try later")
    deliver_due(queue, router, SETTINGS, "mx", now=T0)
    envelope = queue.envelope(queue_id)
    assert envelope.attempts == 1 and envelope.next_attempt == T0 + 60
    assert envelope.recipients[0].last_reply == "451 4.3.0 try later"
    assert deliver_due(queue, router, SETTINGS, "mx", now=T0 + 59) == 0  # not due yet
    deliver_due(queue, router, SETTINGS, "mx", now=T0 + 60)
    assert queue.envelope(queue_id).next_attempt == T0 + 60 + 300  # the next step
    sink.set_reply("RCPT", None)
    deliver_due(queue, router, SETTINGS, "mx", now=T0 + 400)
    assert queue.entries() == [] and len(sink.wait_for(1, timeout=10)) == 1


def test_unreachable_next_hop_defers(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    queue_id = enqueue(queue, ["taro@example.jp"])
    router = Router(SmtpRelay("127.0.0.1", free_port(), timeout=2), {})
    deliver_due(queue, router, SETTINGS, "mx", now=T0)
    reply = queue.envelope(queue_id).recipients[0].last_reply or ""
    assert reply.startswith("451 4.4.1 connect to 127.0.0.1:") and "refused" in reply


def test_permanent_failure_bounces_with_a_delivery_status_report(tmp_path: Path,
                                                                 sink: SmtpSink) -> None:
    queue = Queue(tmp_path)
    with SmtpSink() as refusing:
        refusing.set_reply("RCPT", "550 5.1.1 No such user here")
        router = Router(SmtpRelay("127.0.0.1", sink.port),
                        {"bad.example": SmtpRelay("127.0.0.1", refusing.port)})
        original = enqueue(queue, ["taro@example.jp", "nobody@sub.bad.example"])
        deliver_due(queue, router, SETTINGS, "mx.mailmoat.test", now=T0)
    assert [list(m.rcpt_tos) for m in sink.wait_for(1, timeout=10)] == [["taro@example.jp"]]
    [bounce] = queue.entries()
    assert bounce.sender == "" and [r.address for r in bounce.recipients] == ["a@outside.example"]
    assert bounce.extra == {"bounce_of": original}
    report = email.message_from_bytes(queue.message(bounce.queue_id), policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, headers = report.get_payload()
    assert "<nobody@sub.bad.example>: 550 5.1.1 No such user here" in human.get_content()
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mx.mailmoat.test"
    assert blocks[1]["Final-Recipient"] == "rfc822; nobody@sub.bad.example"
    assert blocks[1]["Status"] == "5.1.1" and blocks[1]["Action"] == "failed"
    assert headers.get_content_type() == "text/rfc822-headers"


def test_mail_past_its_maximum_age_bounces(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    enqueue(queue, ["taro@example.jp"])
    router = Router(SmtpRelay("127.0.0.1", free_port(), timeout=2), {})
    deliver_due(queue, router, SETTINGS, "mx", now=T0 + 3600)
    [bounce] = queue.entries()
    text = queue.message(bounce.queue_id).decode()
    assert "gave up after 1 attempts" in text and "Status: 4.4.1" in text


def test_bounces_are_never_bounced(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    enqueue(queue, ["taro@example.jp"], sender="")
    with SmtpSink() as refusing:
        refusing.set_reply("RCPT", "550 5.1.1 gone")
        deliver_due(queue, Router(SmtpRelay("127.0.0.1", refusing.port), {}), SETTINGS, "mx",
                    now=T0)
    assert queue.entries() == []


def test_maildir_delivery(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "spool")
    enqueue(queue, ["Taro@Example.jp"])
    deliver_due(queue, Router(MaildirDelivery(tmp_path / "maildir"), {}), SETTINGS, "mx",
                now=T0)
    [delivered] = (tmp_path / "maildir" / "taro@example.jp" / "new").iterdir()
    assert delivered.read_bytes().startswith(b"Return-Path: <a@outside.example>\r\n"
                                             b"Delivered-To: Taro@Example.jp\r\n")
    assert delivered.read_bytes().endswith(RAW)


def test_sessions_to_the_next_hop_are_reused_then_closed_when_idle(tmp_path: Path,
                                                                   sink: SmtpSink) -> None:
    """Postfix's connection cache: consecutive messages share one session, also after a
    refused recipient (the transaction is reset, not the session); idle ones are closed."""
    queue = Queue(tmp_path)
    relay = SmtpRelay("127.0.0.1", sink.port, helo="mx.mailmoat.test")
    router = Router(relay, {})
    for _ in range(3):
        enqueue(queue, ["taro@example.jp"])
    deliver_due(queue, router, SETTINGS, "mx", now=T0)
    sink.set_reply("RCPT", "550 5.1.1 no such user")
    refused = enqueue(queue, ["nobody@example.jp"])
    deliver_due(queue, router, SETTINGS, "mx", now=T0)
    sink.set_reply("RCPT", None)
    enqueue(queue, ["hanako@example.jp"])
    deliver_due(queue, router, SETTINGS, "mx", now=T0)
    got = sink.wait_for(4, timeout=10)
    assert len({message.peer for message in got}) == 1, [m.peer for m in got]
    assert queue.entries() == [] and refused not in {e.queue_id for e in queue.entries()}
    kept = relay.sessions.take()  # kept for the next message...
    assert kept is not None
    relay.sessions.give_back(*kept)
    relay.close_idle()
    assert relay.sessions.take() == kept  # ...while fresh...
    relay.sessions.give_back(*kept)
    relay.close_idle(everything=True)
    assert relay.sessions.take() is None  # ...until closed


# -- PIPELINING ----------------------------------------------------------------------------------
def scripted_next_hop(pipelining: bool, replies: dict[str, str]) -> tuple[int, list[bytes],
                                                                          threading.Thread]:
    """A next hop on a raw socket for one session. With `pipelining` it reads MAIL, RCPT
    and DATA before answering any of them (a client that waited for MAIL's reply would
    hang: the test fails on the timeout). Without, it answers each command alone and
    records an error if the next one came before its reply. `replies` overrides MAIL/RCPT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        reader = conn.makefile("rb")
        conn.sendall(b"220 hop ESMTP\r\n")
        assert reader.readline().upper().startswith(b"EHLO")  # smtplib writes "ehlo"
        conn.sendall(b"250-hop\r\n" + (b"250-PIPELINING\r\n" if pipelining else b"")
                     + b"250 8BITMIME\r\n")
        commands = [reader.readline().upper() for _ in range(3)] if pipelining else []
        answers = []
        for verb in ("MAIL", "RCPT", "DATA"):
            if not pipelining:
                commands.append(reader.readline().upper())
                conn.settimeout(0.2)
                try:
                    early = conn.recv(1, socket.MSG_PEEK)
                except TimeoutError:
                    early = b""
                conn.settimeout(10)
                if early:
                    seen.append(b"ERROR: pipelined to a next hop without PIPELINING")
            answers.append(replies.get(verb, "354 go ahead" if verb == "DATA" else "250 ok"))
            if not pipelining:
                conn.sendall(answers[-1].encode() + b"\r\n")
        if pipelining:
            conn.sendall("".join(f"{a}\r\n" for a in answers).encode())
        seen.extend(commands)
        if answers[-1].startswith("354"):
            while (line := reader.readline()) not in (b".\r\n", b""):
                seen.append(line)
            conn.sendall(b"250 queued\r\n")
        while (line := reader.readline().upper()) not in (b"", b"QUIT\r\n"):
            seen.append(line)
            conn.sendall(b"250 ok\r\n")
        conn.sendall(b"221 bye\r\n")
        conn.close()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], seen, thread


@pytest.mark.parametrize("pipelining", [True, False])
def test_the_envelope_is_pipelined_only_to_a_next_hop_that_offers_it(
        tmp_path: Path, pipelining: bool) -> None:
    queue = Queue(tmp_path)
    enqueue(queue, ["taro@example.jp"])
    port, seen, thread = scripted_next_hop(pipelining, {})
    relay = SmtpRelay("127.0.0.1", port, helo="mx.mailmoat.test", timeout=10)
    deliver_due(queue, Router(relay, {}), SETTINGS, "mx", now=T0)
    relay.close_idle(everything=True)
    thread.join(10)
    assert seen[:3] == [b"MAIL FROM:<A@OUTSIDE.EXAMPLE>\r\n", b"RCPT TO:<TARO@EXAMPLE.JP>\r\n",
                        b"DATA\r\n"], seen
    assert b"Subject: hello\r\n" in seen
    assert queue.entries() == []


@pytest.mark.parametrize("refused, status", [("MAIL", "deferred"), ("RCPT", "bounced")])
def test_a_pipelined_refusal_is_recorded_and_the_session_reset(
        tmp_path: Path, refused: str, status: str) -> None:
    """MAIL or the only RCPT refused: DATA's reply (an error, or a 354 from a sloppy next
    hop, which gets the terminating dot and nothing else) is read, the transaction reset."""
    queue = Queue(tmp_path)
    queue_id = enqueue(queue, ["taro@example.jp"])
    reply = {"MAIL": "451 4.3.0 busy", "RCPT": "550 5.1.1 no such user"}[refused]
    port, seen, thread = scripted_next_hop(True, {refused: reply})
    relay = SmtpRelay("127.0.0.1", port, helo="mx.mailmoat.test", timeout=10)
    deliver_due(queue, Router(relay, {}), SETTINGS, "mx", now=T0)
    relay.close_idle(everything=True)
    thread.join(10)
    assert seen[3:] == [b"RSET\r\n"], seen  # no content went out: the dot alone, then RSET
    if status == "deferred":
        assert queue.envelope(queue_id).recipients[0].last_reply == reply
    else:
        assert queue_id not in {e.queue_id for e in queue.entries()}  # bounced, removed
