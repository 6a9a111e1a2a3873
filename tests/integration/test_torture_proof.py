"""Issue 14's proof: every message of the shared MIME torture set
(tests/harness/mime_torture.py), sent over a raw socket as a hostile client sends it, through
the real milters behind `mailmoat serve` and behind a private Postfix:

- attachments, "encrypt everything": every file of the input is inside the ZIP (opened with
  7z, byte for byte) and none is readable outside it, or the message was refused;
- neutralize, "neutralize everything": no live URL in any text part (parsed, not grepped),
  no active HTML, no parser defect the input did not have;
- always: a defined reply within the stage timeouts, no failed milter connection, no
  traceback.
Random mangled trees (hypothesis) go through the same checkers, milter logic called as the
milter calls it, at the end of the file."""
from __future__ import annotations

import contextlib
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from tests.harness.attfail_cases import notice_password
from tests.harness.live_urls import live_urls
from tests.harness.milter_proc import MilterProcess, reinjecting_config
from tests.harness.mime_torture import CASES, TortureMessage, mime_trees, torture_set
from tests.harness.postfix import postfix_instance
from tests.harness.sink import SinkMessage, SmtpSink
from mta.smtp_in.header_end import with_header_ended
from tests.harness.torture_checks import active_html, files_protected, new_defects
from tests.integration.test_serve import Serve
from tests.integration.test_serve_torture import send_raw

pytestmark = pytest.mark.integration

TORTURE = torture_set()
SENDER, RECIPIENT = "a@example.jp", "taro@example.jp"  # send_raw's envelope
ENCRYPT_EVERYTHING = """\
internal_networks: [127.0.0.0/8]
attachments:
  notice: {to: sender, language: ja}
  on_unparsable: encrypt_whole
rules:
  - name: encrypt-everything
    when: {direction: outbound}
    then: {attachments: encrypt}
"""
NEUTRALIZE_EVERYTHING = """\
internal_networks: [10.0.0.0/8]  # the test's client, 127.0.0.1, is a stranger
neutralize:
  on_failure: drop
defaults: {neutralize: neutralize}
"""
# Longer than every stage timeout of the chain: a hang shows as a socket timeout.
REPLY_WITHIN = 120.0
# What our smtpd itself refuses: bare CR or LF in DATA (smuggling).
REFUSED_BY_OUR_SMTPD = {"bare_cr", "bare_lf", "mixed_line_ends"}
# Postfix 3.7 reads a bare-CR message as one From field: no ZIP can hold a header, so the
# attachments milter tempfails it (milters/attachments/certainty.py).
TEMPFAILED_BEHIND_POSTFIX = {"bare_cr"}


class Front:
    """An MTA in front of the milters, relaying to a sink: serve, or Postfix."""

    def __init__(self, port: int, sink: SmtpSink, logs: list[MilterProcess] | Serve,
                 plain_port: int | None = None) -> None:
        self.port, self.sink, self._logs = port, sink, logs
        # Postfix's smtpd without milters: what Postfix makes of a message by itself.
        self.plain_port = plain_port

    def as_the_milter_got_it(self, message: TortureMessage) -> bytes:
        """The input to compare the output's defects with: the message as sent, or as
        Postfix passes it on (it reads bare CR its own way) when no milter runs."""
        if self.plain_port is None:
            return message.raw
        before = len(self.sink.messages)
        assert send_raw(self.plain_port, message.raw, timeout=REPLY_WITHIN) == 250
        (item,) = delivered(self, before, 1, message.name)
        return item.data

    def log(self) -> str:
        if isinstance(self._logs, Serve):
            return self._logs.text()
        return "".join(milter.log_text() for milter in self._logs)


@contextlib.contextmanager
def behind_serve(tmp_path: Path, policy: str, milter: str) -> Iterator[Front]:
    with SmtpSink() as sink:
        serve = Serve(tmp_path, policy=policy, relay=f"smtp:[127.0.0.1]:{sink.port}",
                      milters=f"milters:\n  - {{name: {milter}, content_timeout: 60s}}\n")
        serve.config.write_text(serve.config.read_text().replace(
            "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]"))
        serve.start()
        try:
            yield Front(serve.port, sink, serve)
        finally:
            serve.stop()


@contextlib.contextmanager
def behind_postfix(tmp_path: Path, policy: str, milter: str) -> Iterator[Front]:
    """The milter behind a private Postfix; copies and notices come back through Postfix's
    second smtpd (no milters)."""
    config, reinject_port = reinjecting_config(tmp_path, policy)
    process = MilterProcess(milter, config, tmp_path).start()
    try:
        with SmtpSink() as sink, postfix_instance(
                tmp_path, relay_port=sink.port, smtpd_milters=process.socket_spec,
                reinject_port=reinject_port,
                relay_domains="example.jp, customer.example") as postfix:
            postfix.set_main({"milter_content_timeout": "60s"})
            yield Front(postfix.smtp_port, sink, [process], reinject_port)
    finally:
        process.stop()


FRONTS = {"serve": behind_serve, "postfix": behind_postfix}


def delivered(front: Front, before: int, count: int, name: str) -> list[SinkMessage]:
    items = front.sink.wait_for(before + count, timeout=60)[before:]
    time.sleep(0.2)  # a copy too many would show now
    assert len(front.sink.messages) == before + count, name
    return items


def assert_no_failure(log: str) -> None:
    assert "milter_failed" not in log and "Traceback" not in log, log[-4000:]


@pytest.mark.parametrize("front", FRONTS)
def test_encrypt_everything_never_leaves_a_file_in_the_clear(front: str,
                                                             tmp_path: Path) -> None:
    replies: dict[str, int] = {}
    with FRONTS[front](tmp_path, ENCRYPT_EVERYTHING, "attachments") as gateway:
        for n, name in enumerate(CASES):
            message = TORTURE[name]
            before = len(gateway.sink.messages)
            replies[name] = code = send_raw(gateway.port, message.raw, timeout=REPLY_WITHIN)
            if code != 250:
                continue
            items = delivered(gateway, before, 2, name)
            by_rcpt = {rcpt: item for item in items for rcpt in item.rcpt_tos}
            assert set(by_rcpt) == {RECIPIENT, SENDER}, (name, list(by_rcpt))
            files_protected(message, by_rcpt[RECIPIENT].data,
                            notice_password(by_rcpt[SENDER].data), tmp_path / f"z{n}")
        log = gateway.log()
    assert_no_failure(log)
    refused = {name: code for name, code in replies.items() if code != 250}
    expected = {n: 554 for n in REFUSED_BY_OUR_SMTPD} if front == "serve" else {
        n: 451 for n in TEMPFAILED_BEHIND_POSTFIX}
    assert refused == expected


@pytest.mark.parametrize("front", FRONTS)
def test_neutralize_everything_leaves_nothing_live(front: str, tmp_path: Path) -> None:
    replies: dict[str, int] = {}
    with FRONTS[front](tmp_path, NEUTRALIZE_EVERYTHING, "neutralize") as gateway:
        for name in CASES:
            message = TORTURE[name]
            sent = gateway.as_the_milter_got_it(message)
            before = len(gateway.sink.messages)
            replies[name] = code = send_raw(gateway.port, message.raw, timeout=REPLY_WITHIN)
            if code != 250:
                continue
            (item,) = delivered(gateway, before, 1, name)
            out = item.data
            assert live_urls(out) == [], (name, live_urls(out))
            assert active_html(out) == [], (name, active_html(out))
            assert not new_defects(sent, out), (name, new_defects(sent, out))
        log = gateway.log()
    assert_no_failure(log)
    refused = {name: code for name, code in replies.items() if code != 250}
    expected = {n: 554 for n in REFUSED_BY_OUR_SMTPD} if front == "serve" else {}
    assert refused == expected
    assert live_urls(TORTURE["html_active"].raw) and active_html(TORTURE["html_active"].raw)


# -- random mangled trees, through the milters' logic ---------------------------------------
def as_an_mta_passes_it(raw: bytes) -> bytes:
    """What a milter gets from an MTA: CRLF line ends (a client's own line ends, whichever
    they were), the header ended at the first line that is no field (mta/smtp_in/header_end.py).
    (Bare CR and LF as they reach a milter behind Postfix or our smtpd: the named set
    above; the core's reading of them in random trees: tests/unit/test_mime_torture.py.)"""
    return with_header_ended(re.sub(rb"\r\n|\r|\n", b"\r\n", raw))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(message=mime_trees())
def test_random_trees_encrypted_keep_every_file_inside_the_zip(message: TortureMessage,
                                                               tmp_path: Path) -> None:
    from milters.core.verdict import Action
    from tests.unit.test_attachments_failclosed import run
    verdict, out, sent = run(as_an_mta_passes_it(message.raw),
                             "attachments: {on_unparsable: encrypt_whole}\n")
    assert verdict.action == Action.CONTINUE  # type: ignore[attr-defined]
    if not message.files:
        return
    assert out is not None and len(sent) == 1
    files_protected(message, out, notice_password(sent[0]), Path(tempfile.mkdtemp(dir=tmp_path)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=mime_trees())
def test_random_trees_neutralized_leave_nothing_live(message: TortureMessage) -> None:
    from tests.unit.test_neutralize_texts import run
    sent = as_an_mta_passes_it(message.raw)
    _, out = run(sent)
    assert live_urls(out) == []
    assert active_html(out) == []
    assert not new_defects(sent, out)
