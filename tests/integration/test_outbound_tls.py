"""Outbound TLS per route, as Postfix's smtp_tls_security_level: none, may (the default),
encrypt, verify. Real loopback next hops (aiosmtpd) offering STARTTLS with certificates the
tests make; each refusal defers (4xx, retried) and is logged with the queue ID."""
from __future__ import annotations

import logging
import ssl
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.config import QueueSettings, RelayTarget
from mta.delivery.queue_run import deliver_due
from mta.delivery.routing import Router, agent_for
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.certs import TestCa, server_context
from tests.harness.sink import SmtpSink

pytestmark = pytest.mark.integration

RAW = b"From: a@outside.example\r\nSubject: tls\r\n\r\nbody\r\n"
SETTINGS = QueueSettings(retry=(60.0, 300.0), max_age=3600.0)
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a certificate it signs for 127.0.0.1, one it signs for another name, and a
    self-signed one for 127.0.0.1 (no CA vouches for it)."""
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCa(directory)
    good, good_key = ca.issue("good", "IP:127.0.0.1")
    wrong, wrong_key = ca.issue("wrong-name", "DNS:mx.elsewhere.test")
    stranger = TestCa(directory, "stranger")
    unknown, unknown_key = stranger.issue("unknown-ca", "IP:127.0.0.1")
    return {"ca": ca.cert, "good": good, "good.key": good_key, "wrong": wrong,
            "wrong.key": wrong_key, "unknown": unknown, "unknown.key": unknown_key}


def sink_with(pki: dict[str, Path], cert: str | None) -> SmtpSink:
    context = server_context(pki[cert], pki[f"{cert}.key"]) if cert else None
    return SmtpSink(tls_context=context)


def deliver(tmp_path: Path, port: int, tls: str, ca_file: Path | None = None
            ) -> tuple[Queue, str]:
    queue = Queue(tmp_path / "spool")
    queue_id = queue.enqueue(RAW, Envelope(new_queue_id(T0), "a@outside.example",
                                           [RecipientState("taro@example.jp")], received_at=T0))
    relay = agent_for(RelayTarget(f"smtp:[127.0.0.1]:{port}", tls, ca_file), "mx.mailmoat.test")
    deliver_due(queue, Router(relay, {}), SETTINGS, "mx", now=T0)
    relay.close_idle(everything=True)
    return queue, queue_id


def deferred_reply(queue: Queue, queue_id: str) -> str:
    envelope = queue.envelope(queue_id)
    assert envelope.attempts == 1 and envelope.next_attempt == T0 + 60  # retried on schedule
    return envelope.recipients[0].last_reply or ""


@pytest.mark.parametrize("tls, over_tls", [("none", False), ("may", True), ("encrypt", True)])
def test_each_level_delivers_to_a_next_hop_offering_starttls(
        tmp_path: Path, pki: dict[str, Path], tls: str, over_tls: bool) -> None:
    with sink_with(pki, "unknown") as sink:  # an unverifiable certificate: fine below verify
        queue, _ = deliver(tmp_path, sink.port, tls)
        [got] = sink.wait_for(1)
    assert got.tls is over_tls and queue.entries() == []


def test_verify_delivers_over_a_certificate_the_ca_file_vouches_for(
        tmp_path: Path, pki: dict[str, Path]) -> None:
    with sink_with(pki, "good") as sink:
        queue, _ = deliver(tmp_path, sink.port, "verify", pki["ca"])
        [got] = sink.wait_for(1)
    assert got.tls and queue.entries() == []


@pytest.mark.parametrize("cert, why", [
    ("wrong", "IP address mismatch"),  # signed by the trusted CA, for another name
    ("unknown", "unable to get local issuer certificate"),  # a CA we do not trust
])
def test_verify_defers_on_a_certificate_it_cannot_verify(
        tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture, cert: str,
        why: str) -> None:
    caplog.set_level(logging.INFO, logger="mailmoat")
    with sink_with(pki, cert) as sink:
        queue, queue_id = deliver(tmp_path, sink.port, "verify", pki["ca"])
        assert sink.messages == []
    reply = deferred_reply(queue, queue_id)
    assert reply.startswith("451 4.7.5 Server certificate not verified") and why in reply
    assert f"event=tls_refused queue_id={queue_id}" in caplog.text
    assert f"event=deferred queue_id={queue_id}" in caplog.text


def test_verify_uses_the_system_cas_without_a_ca_file(tmp_path: Path,
                                                      pki: dict[str, Path]) -> None:
    with sink_with(pki, "good") as sink:  # our test CA is not among the system's
        queue, queue_id = deliver(tmp_path, sink.port, "verify")
        assert sink.messages == []
    assert "unable to get local issuer certificate" in deferred_reply(queue, queue_id)


@pytest.mark.parametrize("tls", ["encrypt", "verify"])
def test_a_required_level_defers_when_starttls_is_not_offered(
        tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture,
        tls: str) -> None:
    with sink_with(pki, None) as sink:
        queue, queue_id = deliver(tmp_path, sink.port, tls, pki["ca"] if tls == "verify" else None)
        assert sink.messages == []
    assert deferred_reply(queue, queue_id) == (
        f"451 4.7.4 TLS is required, but was not offered by host 127.0.0.1:{sink.port}")
    assert f"event=tls_refused queue_id={queue_id}" in caplog.text


def test_may_delivers_in_plain_text_to_a_next_hop_without_starttls(
        tmp_path: Path, pki: dict[str, Path]) -> None:
    with sink_with(pki, None) as sink:
        queue, _ = deliver(tmp_path, sink.port, "may")
        [got] = sink.wait_for(1)
    assert not got.tls and queue.entries() == []


def broken_tls(pki: dict[str, Path]) -> SmtpSink:
    """A next hop that offers STARTTLS but cannot complete a handshake with us: it speaks
    only TLS 1.0, which our client refuses."""
    context = server_context(pki["unknown"], pki["unknown.key"])
    with warnings.catch_warnings():  # deprecated, which is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
    return SmtpSink(tls_context=context)


def test_may_falls_back_to_plain_text_when_the_handshake_fails(
        tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with broken_tls(pki) as sink:
        queue, queue_id = deliver(tmp_path, sink.port, "may")
        [got] = sink.wait_for(1)
    assert not got.tls and queue.entries() == []
    assert f"event=tls_fallback queue_id={queue_id} host=127.0.0.1:{sink.port}" in caplog.text


def test_encrypt_defers_when_the_handshake_fails(tmp_path: Path, pki: dict[str, Path]) -> None:
    with broken_tls(pki) as sink:
        queue, queue_id = deliver(tmp_path, sink.port, "encrypt")
        assert sink.messages == []
    assert deferred_reply(queue, queue_id).startswith(
        f"451 4.7.5 TLS handshake with host 127.0.0.1:{sink.port} failed")


@pytest.fixture
def mixed_routes(pki: dict[str, Path]) -> Iterator[tuple[SmtpSink, SmtpSink]]:
    with sink_with(pki, "wrong") as strict, sink_with(pki, "wrong") as lax:
        yield strict, lax


def test_the_level_is_per_route(tmp_path: Path, pki: dict[str, Path],
                                mixed_routes: tuple[SmtpSink, SmtpSink]) -> None:
    """The same wrong-name certificate: the verify route defers, the default (may) delivers."""
    strict, lax = mixed_routes
    queue = Queue(tmp_path / "spool")
    queue_id = queue.enqueue(RAW, Envelope(new_queue_id(T0), "a@outside.example", [
        RecipientState("taro@example.jp"), RecipientState("jiro@secure.example")],
        received_at=T0))
    router = Router(agent_for(RelayTarget(f"smtp:[127.0.0.1]:{lax.port}"), "mx"), {
        "secure.example": agent_for(RelayTarget(f"smtp:[127.0.0.1]:{strict.port}", "verify",
                                                pki["ca"]), "mx")})
    deliver_due(queue, router, SETTINGS, "mx", now=T0)
    router.close_idle(everything=True)
    assert [m.rcpt_tos for m in lax.wait_for(1)] == [("taro@example.jp",)]
    assert strict.messages == []
    [pending] = queue.envelope(queue_id).pending()
    assert pending.address == "jiro@secure.example"
    assert (pending.last_reply or "").startswith("451 4.7.5 Server certificate not verified")
