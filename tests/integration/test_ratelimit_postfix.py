"""The ratelimit milter behind a real, private Postfix on loopback, driven by swaks.

Postfix presents each test's client as a documentation address (192.0.2.x) through XCLIENT,
so the milter sees an outside client although every packet stays on 127.0.0.1.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.milter_proc import ROOT, MilterProcess, write_config
from tests.harness.postfix import PostfixInstance, postfix_instance
from tests.harness.redis_server import RedisServer
from tests.harness.sink import SmtpSink
from tests.harness.swaks import SwaksResult, run_swaks

pytestmark = pytest.mark.integration

SLOW_DOWN = "451 4.7.1 Slow down: too much mail from 192.0.2.x"
BLOCKED = "451 4.7.1 Too many bad recipients; come back later"
REJECT_NOBODY = ("check_recipient_access inline:{nobody@example.jp=REJECT}, "
                 "permit_mynetworks, reject_unauth_destination")


def policy(burst: int = 3, rate: str = "60/min", extra: str = "") -> str:
    return (f"ratelimit:\n"
            f"  limits:\n"
            f"    - {{name: per-ip, key: client_ip, per: message, rate: {rate}, burst: {burst}}}\n"
            f"  reply: \"{SLOW_DOWN}\"\n"
            f"  blocked_reply: \"{BLOCKED}\"\n{extra}")


class Gateway:
    """Postfix + the ratelimit milter + a sink: one mail gateway on loopback."""

    def __init__(self, postfix: PostfixInstance, milter: MilterProcess, sink: SmtpSink) -> None:
        self.postfix, self.milter, self.sink = postfix, milter, sink

    def send(self, client: str = "192.0.2.10", rcpt: str | list[str] = "taro@example.jp",
             mail_from: str = "sender@outside.example") -> SwaksResult:
        return run_swaks(self.postfix.smtp_port, mail_from=mail_from, rcpt=rcpt,
                         xclient_addr=client, header=[f"Subject: test from {client}"])


def start_gateway(tmp_path: Path, sink: SmtpSink, policy_text: str, store: str,
                  name: str = "gw", **postfix_kw: object):  # type: ignore[no-untyped-def]
    workdir = tmp_path / name
    workdir.mkdir()
    config = write_config(workdir, policy_text, store=store)
    milter = MilterProcess("ratelimit", config, workdir)  # started by the caller's `with`
    postfix = postfix_instance(workdir, relay_port=sink.port, smtpd_milters=milter.socket_spec,
                               **postfix_kw)
    return milter, postfix


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


def test_burst_passes_then_policy_4xx_then_passes_after_drain(tmp_path: Path,
                                                             sink: SmtpSink) -> None:
    milter, postfix_cm = start_gateway(tmp_path, sink, policy(burst=3, rate="20/min"),
                                       f"sqlite:///{tmp_path}/state.db")
    with milter, postfix_cm as postfix:
        gateway = Gateway(postfix, milter, sink)
        for _ in range(3):
            result = gateway.send()
            assert result.code("DATA_END") == 250, result.transcript
        refused = gateway.send()
        assert refused.reply_by_stage["MAIL"] == SLOW_DOWN, refused.transcript
        # Another client is not affected by this one's burst.
        assert gateway.send(client="192.0.2.11").code("DATA_END") == 250
        # 20/min: one message drains every 3 s (the sends above take well under that).
        time.sleep(3.2)
        again = gateway.send()
        assert again.code("DATA_END") == 250, again.transcript
        assert gateway.send().reply_by_stage["MAIL"] == SLOW_DOWN
        delivered = sink.wait_for(5, timeout=20)
        assert len(delivered) == 5
        assert sorted(m.message()["Subject"] for m in delivered).count(
            "test from 192.0.2.10") == 4
        milter.wait_for_log(r"event=verdict milter=ratelimit stage=mail action=tempfail "
                            r".*ip=192.0.2.10")
        assert "ip=192.0.2.11" not in "".join(
            line for line in milter.log_text().splitlines() if "action=tempfail" in line)


def test_rejected_recipients_earn_points_that_block_then_decay(tmp_path: Path,
                                                               sink: SmtpSink) -> None:
    # 2 x 25 points, blocking at 15 with a 2 s half-life: blocked for 3.5 s (room for a
    # slow `ratelimit show` on a loaded machine), free again after 4.5 s.
    extra = ("  points:\n    half_life: 2s\n    rejected_recipient: 25\n    tempfail_at: 15\n"
             "    halve_rate_every: 100\n")
    milter, postfix_cm = start_gateway(
        tmp_path, sink, policy(burst=100, extra=extra), f"sqlite:///{tmp_path}/state.db",
        extra={"smtpd_recipient_restrictions": REJECT_NOBODY})
    with milter, postfix_cm as postfix:
        gateway = Gateway(postfix, milter, sink)
        probe = gateway.send(client="192.0.2.20", rcpt=["nobody@example.jp", "nobody@example.jp",
                                                         "taro@example.jp"])
        assert [r[:3] for r in probe.replies("RCPT")] == ["554", "554", "250"], probe.transcript
        milter.wait_for_log(r"event=points .*ip=192.0.2.20 signal=rejected_recipient added=25 "
                            r"points=(49\.\d|50)")
        blocked = gateway.send(client="192.0.2.20")
        assert blocked.reply_by_stage["MAIL"] == BLOCKED, blocked.transcript

        shown = subprocess.run([sys.executable, "-m", "mta.cli", "ratelimit", "show",
                                "192.0.2.20", "--config", str(milter.config)],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert "BLOCKED" in shown.stdout, shown.stdout + shown.stderr

        time.sleep(4.5)  # 50 points fade below the 15 that block after 3.5 s
        recovered = gateway.send(client="192.0.2.20")
        assert recovered.code("DATA_END") == 250, recovered.transcript


def test_reset_unblocks_at_once(tmp_path: Path, sink: SmtpSink) -> None:
    milter, postfix_cm = start_gateway(tmp_path, sink, policy(burst=1, rate="1/hour"),
                                       f"sqlite:///{tmp_path}/state.db")
    with milter, postfix_cm as postfix:
        gateway = Gateway(postfix, milter, sink)
        assert gateway.send(client="192.0.2.30").code("DATA_END") == 250
        assert gateway.send(client="192.0.2.30").reply_by_stage["MAIL"] == SLOW_DOWN
        reset = subprocess.run([sys.executable, "-m", "mta.cli", "ratelimit", "reset",
                                "192.0.2.30", "--config", str(milter.config)],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert reset.returncode == 0, reset.stderr
        assert gateway.send(client="192.0.2.30").code("DATA_END") == 250


def test_two_gateways_share_one_limit_through_redis(tmp_path: Path, sink: SmtpSink) -> None:
    with RedisServer() as redis:
        text = policy(burst=4, rate="1/hour")
        milter_a, postfix_a_cm = start_gateway(tmp_path, sink, text, redis.url, name="a")
        milter_b, postfix_b_cm = start_gateway(tmp_path, sink, text, redis.url, name="b")
        with milter_a, milter_b, postfix_a_cm as postfix_a, postfix_b_cm as postfix_b:
            a = Gateway(postfix_a, milter_a, sink)
            b = Gateway(postfix_b, milter_b, sink)
            codes = [gw.send(client="192.0.2.40").code("DATA_END") for gw in (a, b, a, b)]
            assert codes == [250, 250, 250, 250]
            # Each gateway alone has seen only 2 of its 4; together they have used all 4.
            assert a.send(client="192.0.2.40").reply_by_stage["MAIL"] == SLOW_DOWN
            assert b.send(client="192.0.2.40").reply_by_stage["MAIL"] == SLOW_DOWN


@pytest.mark.parametrize("mode, expected", [("tempfail", "451 4.3.0 State store is down"),
                                            ("local", None)])
def test_unreachable_store_follows_policy(tmp_path: Path, sink: SmtpSink, mode: str,
                                          expected: str | None) -> None:
    extra = (f"  on_store_failure: {mode}\n"
             "  store_failure_reply: \"451 4.3.0 State store is down\"\n")
    milter, postfix_cm = start_gateway(tmp_path, sink, policy(burst=2, extra=extra),
                                       "redis://127.0.0.1:1/0")
    with milter, postfix_cm as postfix:
        gateway = Gateway(postfix, milter, sink)
        results = [gateway.send(client="192.0.2.50") for _ in range(3)]
        if expected is None:  # counting goes on in memory: the burst of 2 still holds
            assert [r.code("DATA_END") for r in results[:2]] == [250, 250]
            assert results[2].reply_by_stage["MAIL"] == SLOW_DOWN
            milter.wait_for_log(r"event=store_unavailable .*action=\"counting in process memory")
        else:
            assert all(r.reply_by_stage["MAIL"] == expected for r in results)
            milter.wait_for_log(r"event=store_unavailable .*stage=mail .*action=tempfail")


def test_internal_networks_pass_untouched(tmp_path: Path, sink: SmtpSink) -> None:
    milter, postfix_cm = start_gateway(tmp_path, sink, policy(burst=1, rate="1/hour"),
                                       "memory://")
    with milter, postfix_cm as postfix:
        port = postfix.smtp_port
        codes = [run_swaks(port, mail_from="app@example.jp", rcpt="x@example.com").code("DATA_END")
                 for _ in range(4)]  # from 127.0.0.1 itself: internal by default
        assert codes == [250] * 4


def test_postfix_reaches_the_milter_over_a_unix_socket(tmp_path: Path, sink: SmtpSink) -> None:
    """smtpd runs as the postfix user: the socket must be usable by it, as README shows."""
    import tempfile
    socket_dir = Path(tempfile.mkdtemp(prefix="mm-sock-", dir="/tmp"))
    socket_dir.chmod(0o755)
    config = write_config(tmp_path, policy(burst=1, rate="1/hour"), store="memory://")
    milter = MilterProcess("ratelimit", config, tmp_path, unix_path=socket_dir / "rl.sock")
    try:
        with milter, postfix_instance(tmp_path, relay_port=sink.port,
                                      smtpd_milters=milter.socket_spec) as postfix:
            gateway = Gateway(postfix, milter, sink)
            assert gateway.send(client="192.0.2.60").code("DATA_END") == 250
            assert gateway.send(client="192.0.2.60").reply_by_stage["MAIL"] == SLOW_DOWN
    finally:
        for leftover in socket_dir.iterdir():
            leftover.unlink()
        socket_dir.rmdir()
