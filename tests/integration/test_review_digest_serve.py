"""The digests through `mailmoat serve` (milters [auth, review], a real Knot DNS for DMARC,
the console serve starts, the test sink): a delay review and an approval held for hanako and
an inbound message quarantined by DMARC p=quarantine for hanako and taro. At the configured
time serve sends one digest each to hanako (her two reviews, the quarantined message), boss
(the approval) and taro (the quarantined message, not hanako's address); boss's approve link
from his digest, confirmed on the console's page, releases the message to the outside; the
next rounds and a restart send no digest again."""
from __future__ import annotations

import email
import re
import smtplib
import time
from datetime import datetime, timedelta
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.harness.bounded import wait_until
from tests.harness.dns_server import KnotServer
from tests.harness.ports import free_port
from tests.harness.review_world import SAMPLE
from tests.harness.sink import SinkMessage, SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.auth_world import AUTHSERV_ID, STRANGER_IP, make_keys, zones
from tests.integration.test_console_review_browser import action_of, text_of
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration
WAIT = 60.0
HANAKO, TARO, BOSS = "hanako@example.jp", "taro@example.jp", "boss@example.jp"
BUYER, OTHER = "buyer@customer.example", "other@customer.example"
QUARANTINED_SUBJECT = "請求書のご案内 (quarantine)"
POLICY = f"""\
internal_networks: [127.0.0.0/8]
own_domains: [example.jp]
review: {{language: en}}
rules:
  - name: buyer-needs-approval
    when: {{direction: outbound, recipient: {BUYER}}}
    then: {{review: {{approve: {{approvers: [{BOSS}], timeout: 1h}}}}}}
  - name: others-wait
    when: {{direction: outbound, recipient: {OTHER}}}
    then: {{review: {{delay: 1h}}}}
"""
LEAD = 25  # seconds from the start to the digest time: the holds are in place by then


def parsed(item: SinkMessage) -> EmailMessage:
    message = email.message_from_bytes(item.data, policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    return message


def digests(sink: SmtpSink) -> list[SinkMessage]:
    return [m for m in sink.messages
            if parsed(m).get("X-Mailmoat-Notice") == "review-digest"]


class World:
    def __init__(self, serve: Serve, sink: SmtpSink, base: str) -> None:
        self.serve, self.sink, self.base = serve, sink, base

    def outbound(self, rcpt: str) -> None:
        result = run_swaks(self.serve.port, mail_from=HANAKO, rcpt=[rcpt], data_file=SAMPLE)
        assert result.code("DATA_END") == 250, result.transcript

    def inbound_quarantined(self) -> str:
        subject = email.header.Header(QUARANTINED_SUBJECT, "utf-8").encode()
        raw = (f"From: boss@quar.test\r\nTo: {HANAKO}\r\nSubject: {subject}\r\n"
               "Message-ID: <digest-q@quar.test>\r\n\r\nplease pay\r\n").encode()
        with smtplib.SMTP("127.0.0.1", self.serve.port, timeout=WAIT) as client:
            client.ehlo("mail.quar.test")
            assert client.docmd("XCLIENT", f"ADDR={STRANGER_IP}")[0] == 220
            client.ehlo("mail.quar.test")
            client.mail("boss@quar.test")
            client.rcpt(HANAKO)
            client.rcpt(TARO)  # a Bcc as far as hanako knows
            code, reply = client.data(raw)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    keys = make_keys(tmp_path / "keys")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with KnotServer(zones(keys), tmp_path / "knot") as dns, SmtpSink() as sink:
        at = (datetime.now() + timedelta(seconds=LEAD)).strftime("%H:%M:%S")
        serve = Serve(tmp_path, policy=POLICY, relay=f"smtp:[127.0.0.1]:{sink.port}",
                      milters="milters: [{name: auth}, {name: review}]\n"
                              f"dns: {{nameservers: [\"{dns.nameserver}\"], timeout: 2s}}\n"
                              f"review: {{console_url: \"{base}\", "
                              "token_key_file: var/review-key,\n"
                              f"  digest: {{at: \"{at}\", every: 1d, domains: [example.jp]}}}}\n"
                              f"console: {{listen: '127.0.0.1:{port}'}}\n")
        serve.config.write_text(serve.config.read_text().replace(
            "hostname: mx.mailmoat.test", f"hostname: {AUTHSERV_ID}").replace(
            "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]"))
        serve.start()
        try:
            yield World(serve, sink, base)
        finally:
            serve.stop()
    assert "Traceback" not in serve.text()


def test_the_digests_go_once_at_their_time_and_the_approvers_link_releases_the_message(
        world: World) -> None:
    serve, sink = world.serve, world.sink
    world.outbound(OTHER)
    world.outbound(BUYER)
    quarantined = world.inbound_quarantined()
    serve.wait_log(rf"queue_id={quarantined}\b.*held", timeout=WAIT)
    serve.wait_log(r"(?s)event=review_held .*event=review_held ", timeout=WAIT)
    assert not digests(sink)  # the schedule's first period is still ahead
    serve.wait_log(r"event=digest_run .*sent=3 failed=0", timeout=LEAD + WAIT)
    found = {m.rcpt_tos: m for m in digests(sink)}
    assert sorted(found) == [(BOSS,), (HANAKO,), (TARO,)], sorted(found)
    assert all(m.mail_from in ("", "<>") for m in found.values())
    assert all(parsed(m)["Auto-Submitted"] == "auto-generated" for m in found.values())

    hanako = text_of(found[(HANAKO,)].data)
    hanako_links = sorted(action_of(u) for u in re.findall(
        rf"{re.escape(world.base)}/review/[A-Za-z0-9_.-]+", hanako))
    assert hanako_links == ["cancel", "cancel", "send_now"], hanako
    assert OTHER in hanako and BUYER in hanako
    assert QUARANTINED_SUBJECT in hanako and f"/held/{quarantined}" in hanako
    # The review holds are listed once, with their links, not again as quarantined mail.
    assert re.findall(r"/held/(\w+)", hanako) == [quarantined], hanako
    assert TARO not in hanako  # a recipient of it: her own address only (taro may be Bcc)
    taro = text_of(found[(TARO,)].data)
    assert QUARANTINED_SUBJECT in taro and HANAKO not in taro
    # No review notice went to taro: his digest is in Japanese (the default).
    assert "/review/" not in taro and "管理者" in taro
    boss = text_of(found[(BOSS,)].data)
    links = re.findall(rf"{re.escape(world.base)}/review/[A-Za-z0-9_.-]+", boss)
    assert sorted(action_of(u) for u in links) == ["approve", "reject"]
    assert QUARANTINED_SUBJECT not in boss

    # The approver's link from the digest: the page (a GET changes nothing), then its form.
    [approve] = [u for u in links if action_of(u) == "approve"]
    with httpx.Client(timeout=30) as client:
        page = client.get(approve)
        assert page.status_code == 200, page.text
        assert not [m for m in sink.messages if BUYER in m.rcpt_tos]
        form_token = re.search(r'name="form_token" value="([^"]+)"', page.text).group(1)
        done = client.post(approve, data={"form_token": form_token})
        assert done.status_code == 200 and "approved" in done.text, done.text
    wait_until(lambda: [m for m in sink.messages if BUYER in m.rcpt_tos], WAIT, serve.text)
    serve.wait_log(r"event=review_released ", timeout=WAIT)

    # More rounds in the same period: no digest again.
    time.sleep(4)
    assert len(digests(sink)) == 3
    assert serve.text().count("event=digest_sent ") == 3
    # A restart the same day sends none either (the period is kept in the spool).
    assert serve.stop() == 0
    serve.start(log_name="serve-2.log")
    serve.wait_log(r"event=serve_started", timeout=WAIT)
    time.sleep(4)
    assert len(digests(sink)) == 3
    assert "event=digest_sent" not in serve.text()
    assert "event=digest_scheduled" not in serve.text()  # it knew the period already
