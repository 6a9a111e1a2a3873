"""`mailmoat queue` goes through mta/operations as cli:USER: its actions reach syslog's mail
log (as postsuper's do) when gateway.log says syslog; its output stays as it was."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from milters.core.eventlog import SYSLOG_SOCKET_ENV
from mta.operations import cli_actor
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.milter_proc import ROOT


def test_queue_actions_reach_syslog_with_the_cli_actor(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("gateway:\n  queue: {dir: spool}\n  log: {to: syslog}\n")
    queue = Queue(tmp_path / "spool")
    queue_id = queue.enqueue(b"Subject: hi\r\n\r\nbody\r\n",
                             Envelope(new_queue_id(), "a@outside.example",
                                      [RecipientState("taro@example.jp"),
                                       RecipientState("hanako@example.jp")], 1_795_900_000.0))
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(path)
        sink.settimeout(10)
        env = {**os.environ, SYSLOG_SOCKET_ENV: path, "PYTHONPATH": str(ROOT)}
        outputs = []
        for words in (["hold", queue_id], ["release", queue_id, "--rcpt", "hanako@example.jp"]):
            done = subprocess.run([sys.executable, "-m", "mta.cli", "queue", *words,
                                   "--config", str(config)], capture_output=True, text=True,
                                  timeout=60, cwd=ROOT, env=env)
            assert done.returncode == 0 and done.stderr == "", done.stderr
            outputs.append(done.stdout)
        held, released = sink.recv(65536).decode(), sink.recv(65536).decode()
    assert outputs[0] == f"{queue_id}: on hold\n"
    assert outputs[1].startswith(f"{queue_id}: released to hanako@example.jp as ")
    who = cli_actor().name
    assert "mailmoat/queue[" in held and (f"event=queue_action action=held queue_id={queue_id} "
                                          f"actor={who} source=cli") in held
    assert "action=released_partly" in released and "recipients=hanako@example.jp" in released
    [rest] = [env for env in queue.entries() if env.queue_id == queue_id]
    assert [r.address for r in rest.recipients] == ["taro@example.jp"] and rest.hold_reason


def test_audit_off_means_queue_actions_write_no_audit_log(tmp_path: Path) -> None:
    """`audit: {enabled: false}` holds for the admin's actions too, not only the tee."""
    def hold(config_text: str) -> None:
        config = tmp_path / "gw.yaml"
        config.write_text(config_text)
        queue = Queue(tmp_path / "spool")
        queue_id = queue.enqueue(b"Subject: hi\r\n\r\nbody\r\n",
                                 Envelope(new_queue_id(), "a@outside.example",
                                          [RecipientState("taro@example.jp")], 1_795_900_000.0))
        done = subprocess.run([sys.executable, "-m", "mta.cli", "queue", "hold", queue_id,
                               "--config", str(config)], capture_output=True, text=True,
                              timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr

    base = "gateway:\n  queue: {dir: spool}\nstore: sqlite:///state.db\n"
    hold(base + "audit: {enabled: false}\n")
    assert not (tmp_path / "state-audit.db").exists()
    hold(base)
    assert (tmp_path / "state-audit.db").exists()
