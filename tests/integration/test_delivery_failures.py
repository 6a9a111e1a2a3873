"""An unexpected error while delivering one message is a failed attempt (DESIGN.md section 8):
logged with the queue ID, retried on the schedule, bounced at max_age. Never left due, so it
never repeats at every scan of the queue."""
from __future__ import annotations

import email
import os
import re
import smtplib
import subprocess
import sys
import time
from email import policy
from pathlib import Path

import pytest

from milters.core.config import GatewayConfig, QueueSettings
from mta.delivery.queue_run import deliver_due
from mta.delivery.agent import DELIVERED, NO_OPTIONS, DeliveryOptions, Outcome
from mta.delivery.routing import Router
from mta.delivery.process import DeliveryScheduler
from mta.queue.spool import Envelope, Queue, RecipientState, SpoolError, StoredMessage, new_queue_id
from tests.harness.milter_proc import ROOT
from tests.harness.ports import is_listening
from tests.harness.swaks import run_swaks
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

RAW = b"From: a@outside.example\r\nSubject: hello\r\n\r\nbody\r\n"
SETTINGS = QueueSettings(retry=(60.0, 300.0), max_age=3600.0)
T0 = 1_800_000_000.0


class Exploding:
    """An agent with a bug: it raises for every message, and counts the tries."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error or RuntimeError("agent bug")
        self.calls = 0

    def deliver(self, sender: str, recipients: list[str], message: StoredMessage,
                options: DeliveryOptions = NO_OPTIONS) -> dict[str, Outcome]:
        self.calls += 1
        raise self.error

    def close_idle(self, everything: bool = False) -> None:
        return None


class Forgetful(Exploding):
    """An agent that answers for the first recipient only."""

    def deliver(self, sender: str, recipients: list[str], message: StoredMessage,
                options: DeliveryOptions = NO_OPTIONS) -> dict[str, Outcome]:
        self.calls += 1
        return {recipients[0]: Outcome(DELIVERED, "250 ok")}


class ExplodingRouter(Router):
    def agent_for(self, recipient: str) -> Exploding:  # type: ignore[override]
        raise KeyError(recipient)


def enqueue(queue: Queue, rcpts: list[str], sender: str = "a@outside.example") -> str:
    return queue.enqueue(RAW, Envelope(new_queue_id(T0), sender,
                                       [RecipientState(r) for r in rcpts], received_at=T0))


@pytest.mark.parametrize("error", [RuntimeError("agent bug"), UnicodeEncodeError(
    "ascii", "ü", 0, 1, "ordinal not in range"), ValueError("embedded null byte"),
    smtplib.SMTPNotSupportedError("no")], ids=["runtime", "unicode", "value", "smtplib"])
def test_an_agent_that_raises_is_retried_on_the_schedule_then_bounced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception) -> None:
    queue = Queue(tmp_path)
    queue_id = enqueue(queue, ["taro@example.jp"])
    agent = Exploding(error)
    router = Router(agent, {})
    assert deliver_due(queue, router, SETTINGS, "mx", now=T0) == 1
    envelope = queue.envelope(queue_id)
    assert envelope.attempts == 1 and envelope.next_attempt == T0 + 60
    assert envelope.recipients[0].last_reply == "451 4.3.0 internal error while delivering"
    assert re.search(rf"event=delivery_error queue_id={queue_id} agent=Exploding "
                     rf"error=\"?{type(error).__name__}", caplog.text), caplog.text
    for now in (T0 + 1, T0 + 30, T0 + 59):  # not due: the error does not repeat every scan
        assert deliver_due(queue, router, SETTINGS, "mx", now=now) == 0
    assert agent.calls == 1
    deliver_due(queue, router, SETTINGS, "mx", now=T0 + 60)
    envelope = queue.envelope(queue_id)
    assert envelope.attempts == 2 and envelope.next_attempt == T0 + 60 + 300
    deliver_due(queue, router, SETTINGS, "mx", now=T0 + 3600)  # max_age: give up, bounce
    assert agent.calls == 3
    [bounce] = queue.entries()
    assert bounce.extra["bounce_of"] == queue_id
    report = email.message_from_bytes(queue.message(bounce.queue_id), policy=policy.default)
    status = report.get_payload()[1].get_payload()[1]
    assert status["Final-Recipient"] == "rfc822; taro@example.jp"
    assert status["Status"] == "4.3.0" and status["Action"] == "failed"
    assert "gave up after 3 attempts" in status["Diagnostic-Code"]


def test_a_router_that_raises_is_a_failed_attempt(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    queue = Queue(tmp_path)
    queue_id = enqueue(queue, ["taro@example.jp"])
    deliver_due(queue, ExplodingRouter(Exploding(), {}), SETTINGS, "mx", now=T0)
    envelope = queue.envelope(queue_id)
    assert envelope.attempts == 1 and envelope.next_attempt == T0 + 60
    assert f"event=delivery_error queue_id={queue_id} to=taro@example.jp" in caplog.text


def test_a_recipient_the_agent_forgot_is_deferred_not_lost(tmp_path: Path) -> None:
    queue = Queue(tmp_path)
    queue_id = enqueue(queue, ["taro@example.jp", "hanako@example.jp"])
    deliver_due(queue, Router(Forgetful(), {}), SETTINGS, "mx", now=T0)
    envelope = queue.envelope(queue_id)
    assert [(r.address, r.status) for r in envelope.recipients] == [
        ("taro@example.jp", "delivered"), ("hanako@example.jp", "pending")]
    assert envelope.next_attempt == T0 + 60


def test_a_bounce_that_cannot_quote_the_original_still_goes_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mta.delivery.queue_run
    real = mta.delivery.queue_run.build_bounce
    calls: list[bytes] = []

    def fragile(envelope: Envelope, raw: bytes, *args: object) -> bytes:
        calls.append(raw)
        if raw:
            raise ValueError("cannot parse the original")
        return real(envelope, raw, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(mta.delivery.queue_run, "build_bounce", fragile)
    queue = Queue(tmp_path)
    queue_id = enqueue(queue, ["taro@example.jp"])
    deliver_due(queue, Router(Exploding(), {}), SETTINGS, "mx", now=T0 + 3600)
    [bounce] = queue.entries()
    assert bounce.extra["bounce_of"] == queue_id and calls == [RAW, b""]


def test_the_scheduler_never_repeats_a_failure_every_scan(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """The delivery process's threads: one raising agent, then a spool that cannot even
    record the failed attempt. Twenty scans (as twenty seconds of SCAN_EVERY would make)
    try each message once."""
    queue = Queue(tmp_path / "spool")
    config = GatewayConfig(queue=QueueSettings(tmp_path / "spool", retry=(60.0,)))
    agent = Exploding()
    raising = enqueue(queue, ["taro@example.jp"])
    scheduler = DeliveryScheduler(queue, Router(agent, {}), config, threads=2)
    try:
        for _ in range(20):
            scheduler.submit_due()
            deadline = time.monotonic() + 10
            while scheduler._busy and time.monotonic() < deadline:
                time.sleep(0.01)
        assert agent.calls == 1
        assert queue.envelope(raising).attempts == 1

        def broken_update(envelope: Envelope) -> None:
            raise SpoolError("spool: cannot update: Read-only file system")

        monkeypatch.setattr(queue, "update", broken_update)
        unrecorded = queue.enqueue(RAW, Envelope(new_queue_id(), "a@outside.example",
                                                 [RecipientState("hanako@example.jp")],
                                                 received_at=time.time()))
        for _ in range(20):
            scheduler.submit_due()
            deadline = time.monotonic() + 10
            while scheduler._busy and time.monotonic() < deadline:
                time.sleep(0.01)
        assert agent.calls == 2  # once more, for the new message only
        assert caplog.text.count(f"event=spool_error queue_id={unrecorded}") == 1
        assert f"queue_id={unrecorded} error=\"SpoolError: spool: cannot update" in caplog.text
    finally:
        scheduler.stop()


# -- over a real serve and its delivery process ------------------------------------------------
SHIM = '''\
"""Test fault: delivery to any boom@ address raises inside the agent."""
from mta.delivery import maildir
from mta.delivery.agent import NO_OPTIONS

_real = maildir.MaildirDelivery.deliver


def _deliver(self, sender, recipients, message, options=NO_OPTIONS):
    if any(r.startswith("boom@") for r in recipients):
        raise RuntimeError("injected delivery fault")
    return _real(self, sender, recipients, message, options)


maildir.MaildirDelivery.deliver = _deliver
'''

OPEN_POLICY = """\
ratelimit:
  limits:
    - {name: per-ip, key: client_ip, per: message, rate: 1000/hour, burst: 100}
"""


def test_a_message_whose_delivery_raises_is_retried_then_bounced_by_serve(
        tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    gateway = Serve(tmp_path, policy=OPEN_POLICY)
    text = gateway.config.read_text()
    gateway.config.write_text(text.replace("  relay: ", "  queue: {retry: [2s, 1h], "
                                                        "max_age: 1h}\n  relay: ", 1))
    _start_with_pythonpath(gateway, f"{ROOT}:{shim}")
    try:
        sent = run_swaks(gateway.port, mail_from="a@outside.example", rcpt="boom@example.jp",
                         xclient_addr="192.0.2.44", header=["Subject: raises"])
        assert sent.code("DATA_END") == 250, sent.transcript
        queue_id = sent.reply_by_stage["DATA_END"].rsplit(" ", 1)[1]
        gateway.wait_log(rf"event=delivery_error queue_id={queue_id} agent=MaildirDelivery "
                         rf"error=\"RuntimeError: injected delivery fault\"")
        gateway.wait_log(rf"event=deferred queue_id={queue_id} next_attempt=2 pending=1")
        gateway.wait_log(rf"event=deferred queue_id={queue_id} next_attempt=3600 pending=1")
        queue = Queue(tmp_path / "var" / "spool")
        envelope = queue.envelope(queue_id)
        assert envelope.attempts == 2
        assert envelope.recipients[0].last_reply == "451 4.3.0 internal error while delivering"
        time.sleep(3)  # three scans of the queue: none tries it again
        assert queue.envelope(queue_id).attempts == 2
        assert gateway.text().count(f"event=delivery_error queue_id={queue_id}") == 2
        # Make it as old as max_age and due: the next scan gives up and bounces it.
        envelope.received_at -= 3600
        envelope.next_attempt = 0.0
        queue.update(envelope)
        gateway.wait_log(rf"event=expired queue_id={queue_id} attempts=3")
        bounced = gateway.wait_log(rf"event=bounced queue_id={queue_id} bounce_id=(\w+)")
        gateway.wait_log(rf"event=removed queue_id={queue_id}")
        gateway.wait_log(rf"event=delivered queue_id={bounced.group(1)} to=a@outside.example")
        [notice] = (tmp_path / "maildir" / "a@outside.example" / "new").iterdir()
        report = email.message_from_bytes(notice.read_bytes(), policy=policy.default)
        status = report.get_payload()[1].get_payload()[1]
        assert status["Final-Recipient"] == "rfc822; boom@example.jp"
        assert status["Status"] == "4.3.0"
    finally:
        gateway.stop()


def _start_with_pythonpath(gateway: Serve, pythonpath: str) -> None:
    """Serve.start with the fault shim on the path of serve and its children."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    env.pop("MAILMOAT_EVENT_LOOP", None)
    with open(gateway.log, "wb") as log:
        gateway.proc = subprocess.Popen([sys.executable, "-m", "mta.cli", "serve", "--config",
                                         str(gateway.config)], cwd=ROOT, stdout=log,
                                        stderr=log, env=env)
    deadline = time.monotonic() + 20
    while "event=serve_started" not in gateway.text():
        assert gateway.proc.poll() is None, f"serve exited:\n{gateway.text()}"
        assert time.monotonic() < deadline, f"serve did not start:\n{gateway.text()}"
        time.sleep(0.05)
    assert is_listening("127.0.0.1", gateway.port)
