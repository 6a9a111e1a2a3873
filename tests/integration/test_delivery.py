"""Delivery from the queue: relay to a next hop, Maildir, retries on the schedule, RFC 3464
bounces for 5xx and for mail past its maximum age, none for the null sender."""
from __future__ import annotations

import email
from email import policy
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.config import QueueSettings
from mta.deliverer import deliver_due
from mta.delivery import MaildirDelivery, Router, SmtpRelay
from mta.queue import Envelope, Queue, RecipientState, new_queue_id
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
