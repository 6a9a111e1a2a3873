"""Nothing is lost: `serve` killed with SIGKILL while it receives and delivers a bounded
batch; after a restart every message that got a 250 is delivered. Duplicates (delivered,
then killed before the queue entry was removed) are counted and reported, as at-least-once
delivery allows."""
from __future__ import annotations

import os
import re
import smtplib
import threading
from pathlib import Path

import pytest

from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

CLIENTS, PER_CLIENT, KILL_AFTER = 4, 40, 70


def send_batch(port: int, client: int, acked: set[str], lock: threading.Lock) -> None:
    for n in range(PER_CLIENT):
        tag = f"c{client}-m{n}"
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                # sendmail returns only after the 250 to DATA, and raises on anything else.
                smtp.sendmail("app@example.jp", ["taro@example.jp"],
                              f"Subject: crash test\r\nX-Test-ID: {tag}\r\n\r\n{tag}\r\n")
        except (OSError, smtplib.SMTPException):
            return  # the gateway died under us: this message was never acknowledged
        with lock:
            acked.add(tag)


def delivered_ids(maildir: Path) -> list[str]:
    box = maildir / "taro@example.jp" / "new"
    if not box.exists():
        return []
    return [m.group(1).decode() for f in box.iterdir()
            if (m := re.search(rb"X-Test-ID: (\S+)", f.read_bytes()))]


def test_sigkill_loses_no_acknowledged_message(tmp_path: Path) -> None:
    roomy = "ratelimit:\n  limits: [{name: m, rate: 1000/s, burst: 100000}]\n"
    gateway = Serve(tmp_path, policy=roomy).start()
    acked: set[str] = set()
    lock = threading.Lock()
    threads = [threading.Thread(target=send_batch, args=(gateway.port, c, acked, lock))
               for c in range(CLIENTS)]
    for t in threads:
        t.start()
    while len(acked) < KILL_AFTER and any(t.is_alive() for t in threads):
        threading.Event().wait(0.01)
    assert gateway.proc is not None
    gateway.proc.kill()  # SIGKILL: no chance to clean up
    gateway.proc.wait(10)
    for t in threads:
        t.join(30)
    killed_with = len(acked)
    assert KILL_AFTER <= killed_with < CLIENTS * PER_CLIENT
    # The milter child must not outlive a killed serve (it would hold its socket).
    milter_pid = int(gateway.wait_log(r"milter=ratelimit pid=(\d+)").group(1))
    for _ in range(100):
        try:
            os.kill(milter_pid, 0)
        except ProcessLookupError:
            break
        threading.Event().wait(0.05)
    else:
        pytest.fail(f"milter {milter_pid} survived the SIGKILL of serve")

    gateway.start("serve-restarted.log")  # same config, spool and maildir
    try:
        gateway.wait_log(r"event=serve_started")
        deadline = 30.0
        while deadline > 0 and not acked <= set(delivered_ids(tmp_path / "maildir")):
            threading.Event().wait(0.2)
            deadline -= 0.2
    finally:
        assert gateway.stop() == 0
    delivered = delivered_ids(tmp_path / "maildir")
    missing = acked - set(delivered)
    duplicates = len(delivered) - len(set(delivered))
    print(f"\ncrash test: {killed_with} acknowledged before SIGKILL, {len(set(delivered))} "
          f"delivered, {len(missing)} lost, {duplicates} duplicate(s)")
    assert not missing, f"acknowledged but never delivered: {sorted(missing)}"
