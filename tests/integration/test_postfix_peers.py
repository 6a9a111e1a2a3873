"""mailmoat between two real Postfix instances: Postfix relays to mailmoat (its SMTP client
pipelines), mailmoat relays to the next Postfix, which delivers to a sink."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.postfix import postfix_instance
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration


def test_postfix_to_mailmoat_to_postfix(tmp_path: Path) -> None:
    with SmtpSink() as sink, \
            postfix_instance(tmp_path / "next", relay_port=sink.port) as next_hop:
        work = tmp_path / "gw"
        work.mkdir()
        gateway = Serve(work, policy="ratelimit: {}\n",
                        relay=f"smtp:[127.0.0.1]:{next_hop.smtp_port}").start()
        try:
            with postfix_instance(tmp_path / "first", relay_port=gateway.port) as first:
                sent = run_swaks(first.smtp_port, mail_from="alice@example.org",
                                 rcpt="taro@example.jp", header=["Subject: via two postfixes"])
                assert sent.code("DATA_END") == 250, sent.transcript
                [message] = sink.wait_for(1, timeout=30)
        finally:
            gateway.stop()
    assert list(message.rcpt_tos) == ["taro@example.jp"]
    parsed = message.message()
    assert parsed["Subject"] == "via two postfixes"
    received = parsed.get_all("Received")
    assert len(received) >= 2  # both Postfix instances stamped it
    gateway.wait_log(r"event=delivered queue_id=\w+ to=taro@example.jp reply=\"250 2.0.0 Ok")
