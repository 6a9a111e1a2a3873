"""A review hold through `mailmoat serve` (milters [review, attachments], the sink): the chain
stops at the hold, so the attachments milter makes its ZIP and sends its password notice only
when the review releases the message; a cancelled message never sends one; a timer survives
a restart of serve and fires once."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.milter_proc import ROOT
from tests.harness.review_world import (OUTSIDE, SAMPLE, SENDER, book_of, kinds, parsed,
                                       review_gateway, settle)
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_review_milter import queue_list
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration
CONSOLE = "http://127.0.0.1:8026"


def policy(delay: str) -> str:
    return f"""\
internal_networks: [127.0.0.0/8]
own_domains: [example.jp]
review: {{language: en}}
rules:
  - name: files-to-outside-wait
    when: {{direction: outbound, outside_recipients: true, attachments: true}}
    then: {{review: {{delay: {delay}}}}}
  - name: outside-recipients-get-a-zip
    when: {{direction: outbound, recipient: ["*", "!@example.jp"]}}
    then: {{attachments: encrypt}}
"""


def make_gateway(tmp_path: Path, sink: SmtpSink, delay: str) -> Serve:
    return review_gateway(tmp_path, sink, policy(delay), CONSOLE)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


def send_held(serve: Serve) -> tuple[str, str]:
    result = run_swaks(serve.port, mail_from=SENDER, rcpt=[OUTSIDE], data_file=SAMPLE)
    assert result.code("DATA_END") == 250, result.transcript
    held = serve.wait_log(r"event=review_held .*queue_id=(\S+) .*review=([0-9a-f]{32})")
    return held.group(1), held.group(2)


def wait_kinds(sink: SmtpSink, count: int, timeout: float = 30) -> list[str]:
    sink.wait_for(count, timeout=timeout)
    return kinds(sink)


def test_a_delayed_message_is_zipped_once_and_its_password_goes_only_after_the_release(
        tmp_path: Path, sink: SmtpSink) -> None:
    serve = make_gateway(tmp_path, sink, "2s").start()
    try:
        queue_id, review_id = send_held(serve)
        listing = queue_list(serve.config)
        assert f"(held: mailmoat-review delay {review_id})" in listing, listing
        assert wait_kinds(sink, 3) == ["outside", "password", "review"], kinds(sink)
        settle(serve, r"event=review_released ")
        assert kinds(sink) == ["outside", "password", "review"]
        log = serve.text()
        timed_out = log.index("event=review_timed_out")
        # The attachments milter ran on the message (its ZIP and its password notice) only
        # after the delay: once, after the timer decided, never before.
        zipped_at = [m.start() for m in re.finditer(r"event=attachments ", log)]
        assert len(zipped_at) == 1 and zipped_at[0] > timed_out, log
        [outside] = [i for i in sink.messages if OUTSIDE in i.rcpt_tos]
        zipped = parsed(outside)
        names = [p.get_filename() for p in zipped.iter_attachments() if p.get_filename()]
        assert len(names) == 1 and names[0].endswith(".zip"), names
        assert "(held:" not in queue_list(serve.config)
        record = book_of(serve).get(review_id)
        assert record is not None and record.state == "sent" and record.carried_out
        assert f"resumed_from={queue_id}" in log
    finally:
        serve.stop()


def test_a_message_cancelled_in_its_delay_never_goes_and_the_sender_is_told(
        tmp_path: Path, sink: SmtpSink) -> None:
    serve = make_gateway(tmp_path, sink, "10m").start()
    try:
        queue_id, review_id = send_held(serve)
        assert wait_kinds(sink, 1) == ["review"]
        book = book_of(serve)  # as the console will: through the book
        book.decide(review_id, SENDER, "127.0.0.1", "cancel")
        assert wait_kinds(sink, 2) == ["review", "review"]
        settle(serve, r"event=review_dropped ")
        assert kinds(sink) == ["review", "review"]  # no message, no password notice
        cancelled = [parsed(i) for i in sink.messages][-1]
        assert "cancel" in str(cancelled["Subject"]).lower(), cancelled["Subject"]
        assert cancelled["Auto-Submitted"] == "auto-generated"
        assert queue_id not in queue_list(serve.config)
        assert book.get(review_id).carried_out
        assert "event=review_released" not in serve.text()
    finally:
        serve.stop()


def test_a_delay_that_ends_while_serve_is_stopped_sends_once_after_the_restart(
        tmp_path: Path, sink: SmtpSink) -> None:
    serve = make_gateway(tmp_path, sink, "3s").start()
    try:
        queue_id, review_id = send_held(serve)
        assert wait_kinds(sink, 1) == ["review"]
    finally:
        assert serve.stop() == 0
    record = book_of(serve).get(review_id)
    assert record is not None and record.state == "pending", record
    # Stopped before the deadline (3 s after the hold); start again only after it.
    wait_until = record.deadline + 0.5
    while time.time() < wait_until:
        time.sleep(0.1)
    assert book_of(serve).get(review_id).state == "pending"  # nothing fired while stopped
    serve.start(log_name="serve-2.log")
    try:
        assert wait_kinds(sink, 3) == ["outside", "password", "review"], kinds(sink)
        settle(serve, r"event=review_released ")
        assert kinds(sink) == ["outside", "password", "review"]  # once
        assert serve.text().count("event=review_timed_out") == 1
        assert book_of(serve).get(review_id).carried_out
        assert queue_id not in queue_list(serve.config)
    finally:
        serve.stop()


def test_queue_release_of_a_review_hold_runs_the_later_milters_first(
        tmp_path: Path, sink: SmtpSink) -> None:
    """`mailmoat queue release` must never send a held message past the attachments milter:
    serve's runner releases it through the rest of the chain (ZIP, password notice)."""
    serve = make_gateway(tmp_path, sink, "10m").start()
    try:
        queue_id, review_id = send_held(serve)
        assert wait_kinds(sink, 1) == ["review"]
        done = subprocess.run([sys.executable, "-m", "mta.cli", "queue", "release", queue_id,
                               "--config", str(serve.config)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert wait_kinds(sink, 3) == ["outside", "password", "review"], kinds(sink)
        settle(serve, r"event=review_released ")
        assert kinds(sink) == ["outside", "password", "review"]
        [outside] = [i for i in sink.messages if OUTSIDE in i.rcpt_tos]
        names = [p.get_filename() for p in parsed(outside).iter_attachments()
                 if p.get_filename()]
        assert len(names) == 1 and names[0].endswith(".zip"), names
        record = book_of(serve).get(review_id)
        assert record.state == "sent" and record.carried_out
        assert record.decisions[-1].source == "queue"
    finally:
        serve.stop()
