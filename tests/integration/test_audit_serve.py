"""The audit log written by a real gateway: a message with an attachment through `mailmoat
serve` and the attachments milter (its own process) to the sink. Its story holds what
happened at each stage, `mailmoat audit verify` finds the chain intact, and the password of
the notice is nowhere in the state files, even with the policy logging it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.milter_proc import ROOT
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_attachments_milter import (EXTERNAL, INTERNAL, POLICY, SAMPLE,
                                                       SENDER, sort_out)
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

# The policy logs the password (an admin's choice): the audit log must still never hold it.
LOGGING_POLICY = POLICY.replace("notice: {to: sender, language: ja}",
                                "notice: {to: sender, language: ja, log_password: true}")


def mailmoat(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.cli", *args, "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_message_story_through_serve_and_the_attachments_milter(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        serve = Serve(tmp_path, policy=LOGGING_POLICY, relay=f"smtp:[127.0.0.1]:{sink.port}",
                      milters="milters: [{name: attachments}]\n")
        serve.config.write_text(serve.config.read_text().replace(
            "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]"))
        serve.start()
        try:
            result = run_swaks(serve.port, mail_from=SENDER, rcpt=[EXTERNAL, INTERNAL],
                               data_file=SAMPLE)
            assert result.code("DATA_END") == 250, result.transcript
            queue_id = result.reply_by_stage["DATA_END"].rsplit(" ", 1)[1]
            sort_out(sink)
            serve.wait_log(rf"event=delivered queue_id={queue_id} to={INTERNAL}")
        finally:
            assert serve.stop() == 0  # SIGTERM: each process writes what it buffered
    password = re.search(r"event=attachments .*password=(\S+)", serve.text())
    assert password, serve.text()[-3000:]

    shown = mailmoat("audit", "show", queue_id, config=serve.config)
    assert shown.returncode == 0, shown.stderr
    story = shown.stdout.splitlines()
    events = [line.split()[2] for line in story]
    # The milter's records come first: it judged the message before it was queued.
    assert events.index("milter_passed") < events.index("queued") < events.index("delivered")
    queued = story[events.index("queued")]
    assert "source=127.0.0.1" in queued and f"sender={SENDER}" in queued
    assert f"rcpts={INTERNAL}" in queued  # the external one went in a re-injected copy
    assert "message_id=<20261128101500.3@example.jp>" in queued and "helo=" in queued
    passed = next(line for line in story if " milter_passed " in line)
    assert "milter=attachments" in passed and "edits=" in passed
    encrypted = next(line for line in story if " encrypted " in line)
    assert re.search(r"zip=AttachFile\.\d{8}\.zip", encrypted), encrypted
    assert f"rcpts={EXTERNAL}" in encrypted and f"notice_to={SENDER}" in encrypted
    assert "actor=mailmoat/attachments" in encrypted
    assert any(" delivered " in line and f"to={INTERNAL}" in line for line in story), story
    assert "password" not in shown.stdout

    # By Message-ID: the same story, and the re-injected ZIP copy's (same Message-ID).
    by_id = mailmoat("audit", "show", "<20261128101500.3@example.jp>", config=serve.config)
    assert set(story) < set(by_id.stdout.splitlines())
    assert re.search(rf" delivered queue_id=(?!{queue_id}).* to={EXTERNAL}", by_id.stdout)

    verified = mailmoat("audit", "verify", config=serve.config)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert re.fullmatch(r"audit: \d+ records, chain intact\n", verified.stdout)
    count = int(verified.stdout.split()[1])
    assert count >= len(story) + 2  # the copy and the notice have stories of their own

    secret = password.group(1).encode()
    assert list(tmp_path.glob("state-audit.db*"))
    for state in tmp_path.glob("state*"):
        assert secret not in state.read_bytes(), state


def test_tampering_with_the_gateways_log_is_found(tmp_path: Path) -> None:
    """The SQLite file a gateway wrote, changed as an intruder would with sqlite3(1)."""
    import sqlite3
    serve = Serve(tmp_path, milters="milters: [{name: ratelimit}]\n").start()
    try:
        for _ in range(2):
            assert run_swaks(serve.port, mail_from="a@outside.example", rcpt="taro@example.jp",
                             xclient_addr=f"192.0.2.{_ + 1}").code("DATA_END") == 250
        deadline = time.monotonic() + 15
        while _records(serve.config) < 6:  # queued, verdict, delivered, removed (x2)...
            assert time.monotonic() < deadline, "the records did not arrive"
            time.sleep(0.2)
    finally:
        serve.stop()
    assert mailmoat("audit", "verify", config=serve.config).returncode == 0
    with sqlite3.connect(tmp_path / "state-audit.db") as db:
        db.execute("UPDATE audit SET source = '198.51.100.9' WHERE seq = 2")
    verified = mailmoat("audit", "verify", config=serve.config)
    assert (verified.returncode, verified.stdout) == (
        1, "audit: record 2: hash does not match (changed or removed)\n")


def _records(config: Path) -> int:
    found = re.match(r"audit: (\d+) records", mailmoat("audit", "verify", config=config).stdout)
    return int(found.group(1)) if found else 0
