"""Self-tests of the Postfix / sink / swaks harness (real Postfix on 127.0.0.1)."""
from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.ports import free_port
from tests.harness.postfix import POSTFIX, PostfixInstance, postfix_instance
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks

# Postfix, swaks and root are requirements (scripts/setup installs them): no skipping.
pytestmark = pytest.mark.integration

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
TEMPFAIL_REPLY = "451 4.7.1 Service unavailable - try again later"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


def _queue_id(reply: str) -> str:
    match = re.search(r"queued as ([0-9A-Za-z]+)", reply)
    assert match, reply
    return match.group(1)


def _alive(pid: int) -> bool:
    """Running and not a zombie (orphans wait a moment for PID 1 to reap them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def test_message_reaches_sink_with_subject(tmp_path: Path, sink: SmtpSink) -> None:
    with postfix_instance(tmp_path, relay_port=sink.port) as pf:
        assert pf.postconf("smtpd_milters") == ""
        result = run_swaks(pf.smtp_port, mail_from=SENDER, rcpt=RECIPIENT,
                           header=["Subject: harness self-test 1"], body="hello sink\r\n")
        assert result.returncode == 0, result.transcript
        assert result.final_reply_code == 250, result.transcript
        queue_id = _queue_id(result.reply_by_stage["DATA_END"])

        [msg] = sink.wait_for(1, timeout=15)
        assert msg.mail_from == SENDER
        assert msg.rcpt_tos == (RECIPIENT,)
        assert msg.peer[0] == "127.0.0.1"
        parsed = msg.message()
        assert parsed["Subject"] == "harness self-test 1"
        assert "hello sink" in parsed.get_content()
        # Postfix's own Received: header names the queue id it gave the message.
        assert f"id {queue_id}" in parsed["Received"]

        pf.wait_for_log(rf"postfix/smtpd\[\d+\]: {queue_id}: client=localhost\[127\.0\.0\.1\]")
        pf.wait_for_log(
            rf"{queue_id}: to=<{re.escape(RECIPIENT)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
            rf"{sink.port},.* status=sent", timeout=10)
        pf.wait_queue_empty(timeout=10)
    # The log outlives the instance's temp dir for post-mortems.
    assert queue_id in (tmp_path / "postfix" / "maillog").read_text()


def test_xclient_presents_documentation_address(tmp_path: Path, sink: SmtpSink) -> None:
    with postfix_instance(tmp_path, relay_port=sink.port) as pf:
        result = run_swaks(pf.smtp_port, mail_from=SENDER, rcpt=RECIPIENT,
                           xclient_addr="192.0.2.10", header="Subject: via xclient")
        assert result.code("XCLIENT") == 220, result.transcript
        assert result.final_reply_code == 250, result.transcript
        queue_id = _queue_id(result.reply_by_stage["DATA_END"])

        # NAME=[UNAVAILABLE] is sent too; otherwise Postfix would keep "localhost".
        pf.wait_for_log(rf"postfix/smtpd\[\d+\]: {queue_id}: client=unknown\[192\.0\.2\.10\]")
        [msg] = sink.wait_for(1, timeout=15)
        assert "[192.0.2.10]" in msg.message()["Received"]


def test_milter_down_with_tempfail_gives_451_at_mail(tmp_path: Path, sink: SmtpSink) -> None:
    closed_port = free_port()  # nothing listens there
    with postfix_instance(tmp_path, relay_port=sink.port,
                          smtpd_milters=f"inet:127.0.0.1:{closed_port}",
                          milter_default_action="tempfail") as pf:
        result = run_swaks(pf.smtp_port, mail_from=SENDER, rcpt=RECIPIENT)
        # The milter fails at CONNECT, but smtpd_delay_reject holds the 4xx
        # until MAIL FROM: banner and EHLO still get 220/250.
        assert result.code("CONNECT") == 220
        assert result.code("EHLO") == 250
        assert result.reply_by_stage["MAIL"] == TEMPFAIL_REPLY, result.transcript
        assert "RCPT" not in result.reply_by_stage
        assert result.final_reply_code == 451
        assert result.returncode == 23  # swaks: error in MAIL transaction

        pf.wait_for_log(rf"warning: connect to Milter service inet:127\.0\.0\.1:{closed_port}:"
                        r" Connection refused")
        pf.wait_for_log(r"NOQUEUE: milter-reject: CONNECT from localhost\[127\.0\.0\.1\]: "
                        + re.escape(TEMPFAIL_REPLY))
        pf.wait_for_log(r"NOQUEUE: milter-reject: MAIL from localhost\[127\.0\.0\.1\]: "
                        + re.escape(TEMPFAIL_REPLY))
        assert pf.queue_ids() == []
        assert sink.messages == []


def test_milter_down_with_reject_refuses_the_session(tmp_path: Path, sink: SmtpSink) -> None:
    closed_port = free_port()
    with postfix_instance(tmp_path, relay_port=sink.port,
                          smtpd_milters=f"inet:127.0.0.1:{closed_port}",
                          milter_default_action="reject") as pf:
        result = run_swaks(pf.smtp_port, mail_from=SENDER, rcpt=RECIPIENT)
        # Unlike tempfail, a 5xx at CONNECT is not delayed: smtpd greets with 554.
        assert result.reply_by_stage["CONNECT"] == (
            "554 mx.mailmoat.test ESMTP not accepting connections"), result.transcript
        assert "MAIL" not in result.reply_by_stage
        assert result.returncode == 21  # swaks: error reading the banner
        pf.wait_for_log(r"NOQUEUE: milter-reject: CONNECT from localhost\[127\.0\.0\.1\]: "
                        r"550 5\.5\.0 Service unavailable")
        assert sink.messages == []


def test_milter_down_with_accept_delivers(tmp_path: Path, sink: SmtpSink) -> None:
    closed_port = free_port()
    with postfix_instance(tmp_path, relay_port=sink.port,
                          smtpd_milters=f"inet:127.0.0.1:{closed_port}",
                          milter_default_action="accept") as pf:
        result = run_swaks(pf.smtp_port, mail_from=SENDER, rcpt=RECIPIENT)
        assert result.final_reply_code == 250, result.transcript
        sink.wait_for(1, timeout=15)


def test_set_main_reload_takes_effect_on_next_connection(tmp_path: Path,
                                                         sink: SmtpSink) -> None:
    with postfix_instance(tmp_path, relay_port=sink.port) as pf:
        assert run_swaks(pf.smtp_port, mail_from=SENDER, rcpt=RECIPIENT).final_reply_code == 250
        pf.set_main({"smtpd_milters": f"inet:127.0.0.1:{free_port()}"})
        result = run_swaks(pf.smtp_port, mail_from=SENDER, rcpt=RECIPIENT)
        assert result.reply_by_stage["MAIL"] == TEMPFAIL_REPLY, result.transcript
        pf.set_main({"smtpd_milters": ""})
        assert run_swaks(pf.smtp_port, mail_from=SENDER, rcpt=RECIPIENT).final_reply_code == 250
        sink.wait_for(2, timeout=15)


def test_deferred_mail_is_flushed_to_a_recovered_next_hop(tmp_path: Path,
                                                         sink: SmtpSink) -> None:
    sink.set_reply("RCPT", "451 4.3.0 next hop busy")
    with postfix_instance(tmp_path, relay_port=sink.port) as pf:
        result = run_swaks(pf.smtp_port, mail_from=SENDER, rcpt=RECIPIENT)
        queue_id = _queue_id(result.reply_by_stage["DATA_END"])
        pf.wait_for_log(rf"{queue_id}: .*status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] "
                        r"said: 451 4\.3\.0 next hop busy")
        assert sink.refusals[0].stage == "RCPT"
        assert pf.queue_ids() == [queue_id]
        sink.set_reply("RCPT", None)
        pf.flush()
        [msg] = sink.wait_for(1, timeout=15)
        assert msg.rcpt_tos == (RECIPIENT,)
        pf.wait_queue_empty(timeout=10)


def test_stop_leaves_no_process_of_the_instance(sink: SmtpSink) -> None:
    pf = PostfixInstance(relay_port=sink.port, keep_dir=True)
    pf.start()
    try:
        master = pf.master_pid()
        pids = pf.pids()
        assert master is not None and master in pids
        # master leads its own session; every daemon it spawns is in it.
        in_session = subprocess.run(["pgrep", "-s", str(master)], capture_output=True,
                                    text=True, check=False).stdout.split()
        assert set(pids) <= {int(p) for p in in_session}
        config_dir = pf.config_dir
        pf.stop()

        assert pf.pids() == []
        assert not any(_alive(pid) for pid in pids)
        left = subprocess.run(["pgrep", "-s", str(master)], capture_output=True,
                              text=True, check=False).stdout.split()
        assert not any(_alive(int(pid)) for pid in left)
        # Postfix's own liveness test (master -t on the lock file) agrees.
        status = subprocess.run([POSTFIX, "-c", str(config_dir), "status"],
                                capture_output=True, check=False)
        assert status.returncode == 1
        assert "is not running" in (pf.base_dir / "maillog").read_text().splitlines()[-1]
    finally:
        pf.stop()
        shutil.rmtree(pf.base_dir, ignore_errors=True)
