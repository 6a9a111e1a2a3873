"""Releasing held mail to some recipients only, as an admin does it on a running gateway:
`mailmoat queue release ID --rcpt ADDR` beside `mailmoat serve`, delivery to the sink."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.milter_proc import ROOT
from tests.harness.sink import SmtpSink
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration
RECIPIENTS = ["a@example.jp", "b@example.jp", "c@example.jp"]
RAW = ("From: x@outside.example\r\nTo: a@example.jp, b@example.jp, c@example.jp\r\n"
       "Subject: =?UTF-8?B?5L+d55WZ44Oh44O844Or?=\r\nMessage-ID: <held-1@outside.example>\r\n"
       "\r\nheld body\r\n").encode()


def mailmoat(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.cli", "queue", *args,
                           "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_partial_release_delivers_to_the_chosen_recipients_only(tmp_path: Path) -> None:
    # Queued and held before the gateway starts, as DMARC quarantine leaves it.
    queue = Queue(tmp_path / "var" / "spool")
    queue_id = queue.enqueue(RAW, Envelope(new_queue_id(), "x@outside.example",
                                           [RecipientState(r) for r in RECIPIENTS],
                                           1_795_900_000.0, hold_reason="DMARC quarantine"))
    with SmtpSink() as sink:
        serve = Serve(tmp_path, relay=f"smtp:[127.0.0.1]:{sink.port}").start()
        try:
            wrong = mailmoat(serve.config, "release", queue_id, "--rcpt", "z@example.jp")
            assert wrong.returncode == 1
            assert wrong.stderr == (f"mailmoat: message {queue_id} has no held recipient "
                                    "z@example.jp\n")
            done = mailmoat(serve.config, "release", queue_id, "--rcpt", "B@example.jp")
            assert done.returncode == 0, done.stderr
            new_id = done.stdout.split(" as ")[1].split(";")[0]
            assert done.stdout == (f"{queue_id}: released to b@example.jp as {new_id}; "
                                   "the rest stay held\n")
            [first] = sink.wait_for(1, timeout=30)
            serve.wait_log(rf"event=delivered queue_id={new_id} to=b@example.jp")
            serve.wait_log(rf"event=removed queue_id={new_id}\b")
            assert first.rcpt_tos == ("b@example.jp",) and b"held body" in first.data
            assert first.message()["Subject"] == "保留メール"
            # The rest is still held, durable on disk, with only the other two recipients.
            listing = mailmoat(serve.config, "list").stdout
            assert f"{queue_id}!" in listing and "(held: DMARC quarantine)" in listing
            assert "a@example.jp (pending)" in listing and "c@example.jp (pending)" in listing
            assert "b@example.jp" not in listing and new_id not in listing
            assert len(sink.messages) == 1
            assert f"event=delivered queue_id={queue_id}" not in serve.text()
            rest = mailmoat(serve.config, "release", queue_id)
            assert rest.stdout == f"{queue_id}: released\n", rest.stderr
            [_, second] = sink.wait_for(2, timeout=30)
            assert second.rcpt_tos == ("a@example.jp", "c@example.jp")
        finally:
            serve.stop()
    assert [m.mail_from for m in sink.messages] == ["x@outside.example"] * 2
