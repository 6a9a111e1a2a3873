"""`mailmoat serve` as an admin runs it: SMTP in, the ratelimit milter started and supervised
over a unix socket, delivery to Maildir, and a clean stop on SIGTERM."""
from __future__ import annotations

import json
import os
import pwd
import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.milter_proc import ROOT
from tests.harness.ports import free_port, is_listening
from tests.harness.swaks import run_swaks

pytestmark = pytest.mark.integration
RUN_AS = "root" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

POLICY = """\
ratelimit:
  limits:
    - {name: per-ip, key: client_ip, per: message, rate: 1/hour, burst: 1}
  reply: "451 4.7.1 Slow down from serve"
"""


class Serve:
    # serve in a process group (session) of its own: one killpg() reaches all its processes.
    own_session = False
    start_timeout = 20.0  # seconds for serve_started

    def __init__(self, tmp_path: Path, policy: str = POLICY, milters: str = "",
                 relay: str = "maildir:maildir") -> None:
        self.dir = tmp_path
        self.port, self.reinject, self.metrics = free_port(), free_port(), free_port()
        (tmp_path / "policy.yaml").write_text(policy)
        self.config = tmp_path / "gateway.yaml"
        self.config.write_text(
            f"gateway:\n  hostname: mx.mailmoat.test\n  listen: 127.0.0.1:{self.port}\n"
            # The tests run as root, whose Python (/root/.pyenv) no other user can reach;
            # the drop itself is tested in test_privileges.py.
            f"  user: {RUN_AS}\n"
            f"  reinject_listen: 127.0.0.1:{self.reinject}\n  relay_domains: [example.jp]\n"
            f"  metrics_listen: 127.0.0.1:{self.metrics}\n"
            f"  xclient_hosts: [127.0.0.0/8]\n"
            f"  relay: {{default: \"{relay}\"}}\n"
            f"store: sqlite:///state.db\npolicy: policy.yaml\n{milters}")
        self.log = tmp_path / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.event_loop = "uvloop"  # what serve runs on unless MAILMOAT_EVENT_LOOP says

    def start(self, log_name: str = "serve.log", event_loop: str | None = None,
              env: dict[str, str] | None = None) -> "Serve":
        self.log = self.dir / log_name
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        env.pop("MAILMOAT_EVENT_LOOP", None)
        if event_loop is not None:
            env["MAILMOAT_EVENT_LOOP"] = self.event_loop = event_loop
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "mta.cli", "serve", "--config",
                                          str(self.config)], cwd=ROOT, stdout=log, stderr=log,
                                         env=env, start_new_session=self.own_session)
        # The log line, not a connect probe: a probe would be an SMTP session of its own
        # (and a milter session) in every count a test makes.
        deadline = time.monotonic() + self.start_timeout
        while "event=serve_started" not in self.text():
            assert self.proc.poll() is None, f"serve exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{self.text()}"
            time.sleep(0.05)
        assert is_listening("127.0.0.1", self.port)
        return self

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.text())):
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.text()}"
            time.sleep(0.1)
        return match

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def serve(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Serve]:
    gateway = Serve(tmp_path).start(event_loop=getattr(request, "param", None))
    try:
        yield gateway
    finally:
        if gateway.proc and gateway.proc.poll() is None:
            gateway.stop()


def outside(port: int, rcpt: str = "taro@example.jp",  # type: ignore[no-untyped-def]
            client: str = "192.0.2.44"):
    return run_swaks(port, mail_from="a@outside.example", rcpt=rcpt, xclient_addr=client,
                     header=["Subject: through serve"])


# uvloop is the default; the standard library's loop is the fallback and must work the same.
@pytest.mark.parametrize("serve", [None, "asyncio"], indirect=True, ids=["default", "asyncio"])
def test_mail_goes_through_the_milter_chain_to_the_maildir(serve: Serve) -> None:
    started = serve.wait_log(r"event=serve_started .*\bloop=(\S+)")
    assert started.group(1) == serve.event_loop
    first = outside(serve.port)
    assert first.code("DATA_END") == 250, first.transcript
    second = outside(serve.port)
    assert second.reply_by_stage["MAIL"] == "451 4.7.1 Slow down from serve"
    relay = outside(serve.port, rcpt="victim@elsewhere.example", client="192.0.2.45")
    assert relay.replies("RCPT") == ["554 5.7.1 <victim@elsewhere.example>: Relay access denied"]
    queue_id = first.reply_by_stage["DATA_END"].rsplit(" ", 1)[1]
    serve.wait_log(rf"event=delivered queue_id={queue_id} to=taro@example.jp")
    [delivered] = (serve.dir / "maildir" / "taro@example.jp" / "new").iterdir()
    assert b"Subject: through serve" in delivered.read_bytes()


def test_a_dead_milter_is_restarted(serve: Serve) -> None:
    pid = int(serve.wait_log(r"event=milter_process_started milter=ratelimit pid=(\d+)").group(1))
    os.kill(pid, signal.SIGKILL)
    serve.wait_log(r"event=milter_process_died .*milter=ratelimit .*action=restarting")
    serve.wait_log(rf"event=milter_process_started milter=ratelimit pid=(?!{pid}\b)\d+")
    assert outside(serve.port).code("DATA_END") == 250


def test_reinjection_listener_skips_the_milters(serve: Serve) -> None:
    for _ in range(3):  # over the ratelimit burst of 1: re-injected mail is not limited
        result = run_swaks(serve.reinject, mail_from="notice@example.jp", rcpt="taro@example.jp")
        assert result.code("DATA_END") == 250, result.transcript


def test_sigterm_stops_everything(serve: Serve) -> None:
    pid = int(serve.wait_log(r"event=milter_process_started milter=ratelimit pid=(\d+)").group(1))
    assert serve.stop() == 0
    text = serve.text()
    assert "event=milter_process_stopped milter=ratelimit" in text
    assert "event=serve_stopped" in text
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_scan_shows_exactly_what_the_gateway_queues(tmp_path: Path, action_milter: int) -> None:
    """The same sample through `serve` (SMTP) and through `scan`: same verdicts, same bytes."""
    milters = ("milters:\n  - {name: ratelimit}\n"
               f"  - {{name: action, socket: \"inet:127.0.0.1:{action_milter}\"}}\n")
    roomy = "ratelimit:\n  limits: [{name: m, rate: 100/min, burst: 100}]\n"
    gateway = Serve(tmp_path, policy=roomy, milters=milters).start()
    sample = ROOT / "samples" / "plain-en.eml"
    try:
        # smtplib sends the file's bytes exactly (swaks adds a line end of its own).
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
            client.ehlo("client.example")
            assert client.docmd("XCLIENT", "ADDR=192.0.2.60")[0] == 220
            client.ehlo("client.example")
            client.mail("alice@partner.example")
            client.rcpt("taro@example.jp")
            code, reply = client.data(sample.read_bytes())
        assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[1]
        out = tmp_path / "scanned.eml"
        scanned = subprocess.run(
            [sys.executable, "-m", "mta.cli", "scan", str(sample), "--client-ip", "192.0.2.60",
             "--helo", "client.example", "--config", str(gateway.config), "--out", str(out),
             "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        shown = subprocess.run([sys.executable, "-m", "mta.cli", "queue", "show", queue_id,
                                "--config", str(gateway.config)],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        gateway.stop()
    assert scanned.returncode == 0, scanned.stderr
    report = json.loads(scanned.stdout)
    assert report["verdict"] == "accept"
    assert [m["name"] for m in report["milters"]] == ["ratelimit", "action"]
    assert report["hold"] == "held for review"
    assert [a["action"] for a in report["milters"][1]["actions"]][:3] == [
        "AddHeader", "AddHeader", "ChangeHeader"]
    from mta.queue.spool import Queue
    queued = Queue(tmp_path / "var" / "spool")
    # Byte for byte, but for the queue ID each run is given (the action milter echoes it)
    # and the time in our Received: header.
    def same_run(raw: bytes, run_id: str) -> bytes:
        return re.sub(rb"(for <taro@example.jp>; ).*\r\n", rb"\1DATE\r\n",
                      raw.replace(run_id.encode(), b"QID"), count=1)
    assert same_run(out.read_bytes(), report["queue_id"]) == \
        same_run(queued.message(queue_id), queue_id)
    # Our trace header, under the one the action milter inserted at the top (index 0).
    assert queued.message(queue_id).startswith(
        b"X-Inserted: inserted at the top\r\n"
        b"Received: from client.example (unknown [192.0.2.60])\r\n"
        b"\tby mx.mailmoat.test (mailmoat) with ESMTP id " + queue_id.encode() + b"\r\n"
        b"\tfor <taro@example.jp>; ")
    assert b"X-Seen-Macros: i=QID" in queued.message(queue_id).replace(queue_id.encode(), b"QID")
    envelope = queued.envelope(queue_id)
    assert envelope.hold_reason == report["hold"]
    assert [r.address for r in envelope.recipients] == report["envelope"]["recipients"]
    assert envelope.sender == report["envelope"]["sender"] == "new-sender@example.jp"
    assert "*** MESSAGE ***" in shown.stdout


def test_prometheus_metrics(serve: Serve) -> None:
    assert outside(serve.port).code("DATA_END") == 250
    assert outside(serve.port).reply_by_stage["MAIL"].startswith("451")  # ratelimit refuses
    serve.wait_log(r"event=delivered ")
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{serve.metrics}/metrics", timeout=10) as page:
        assert page.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = page.read().decode()
    lines = set(text.splitlines())
    assert "mailmoat_messages_received_total 1" in lines
    assert "mailmoat_messages_queued_total 1" in lines
    assert 'mailmoat_deliveries_total{status="delivered"} 1' in lines
    assert 'mailmoat_messages_rejected_total{by="ratelimit"} 1' in lines
    assert "mailmoat_queue_messages 0" in lines
    assert any(line.startswith('mailmoat_milter_latency_seconds_count{milter="ratelimit",'
                               'stage="mail"} ') for line in lines)


def test_an_unknown_event_loop_is_a_clear_error(tmp_path: Path) -> None:
    gateway = Serve(tmp_path)
    result = subprocess.run([sys.executable, "-m", "mta.cli", "serve", "--config",
                             str(gateway.config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT),
                                             "MAILMOAT_EVENT_LOOP": "tokio"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "MAILMOAT_EVENT_LOOP='tokio': use one of uvloop, asyncio" in result.stderr


def test_milter_connections_are_kept_between_sessions(tmp_path: Path) -> None:
    """Three SMTP sessions one after the other: the ratelimit milter's connection is opened
    once and reused twice (QUIT_NC), and each message still goes through it."""
    policy = ("ratelimit:\n  exempt_internal: false\n  limits:\n"
              "    - {name: per-ip, key: client_ip, per: message, rate: 10/hour, burst: 10}\n")
    gateway = Serve(tmp_path, policy=policy).start()
    try:
        for _ in range(3):
            result = run_swaks(gateway.port, mail_from="a@outside.example", rcpt="taro@example.jp")
            assert result.code("DATA_END") == 250, result.transcript
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics}/metrics",
                                    timeout=10) as page:
            lines = set(page.read().decode().splitlines())
        sessions = sorted(line for line in lines
                          if line.startswith("mailmoat_milter_sessions_total{"))
        assert sessions == [
            'mailmoat_milter_sessions_total{connection="new",milter="ratelimit"} 1',
            'mailmoat_milter_sessions_total{connection="reused",milter="ratelimit"} 2'], sessions
        assert any(line.startswith('mailmoat_milter_latency_seconds_count{milter="ratelimit",'
                                   'stage="message"} 3') for line in lines)
    finally:
        gateway.stop()


def test_a_client_that_never_sends_mail_is_still_counted_by_the_milter(tmp_path: Path
                                                                        ) -> None:
    """The connect step the milter does not answer is held back for the next packet; a
    session that ends before MAIL sends it with QUIT, so a connection limit still counts
    clients that only say EHLO and leave."""
    policy = ("ratelimit:\n  exempt_internal: false\n  limits:\n"
              "    - {name: per-ip, key: client_ip, per: connection, rate: 1/hour, burst: 1}\n"
              "  reply: \"451 4.7.1 Too many connections\"\n")
    gateway = Serve(tmp_path, policy=policy).start()
    try:
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
            client.ehlo("only-says-hello.example")  # and QUIT
        result = run_swaks(gateway.port, mail_from="a@outside.example", rcpt="taro@example.jp")
        assert result.reply_by_stage["MAIL"] == "451 4.7.1 Too many connections", \
            result.transcript
    finally:
        gateway.stop()


def test_the_delivery_process_runs_below_serve(serve: Serve) -> None:
    """Deliveries yield the CPU to clients waiting for a reply: queue.delivery_nice (5)."""
    assert serve.proc is not None
    pid = int(serve.wait_log(r"event=delivery_process_started pid=(\d+)").group(1))
    serve.wait_log(rf"event=delivery_started pid={pid} .*nice=")
    assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(
        os.PRIO_PROCESS, serve.proc.pid) + 5
    assert outside(serve.port).code("DATA_END") == 250  # and still delivers
    serve.wait_log(r"event=delivered ")


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    gateway = Serve(tmp_path)
    gateway.config.write_text(gateway.config.read_text().replace(
        f"listen: 127.0.0.1:{gateway.port}\n", f"listen: 127.0.0.1:{taken.getsockname()[1]}\n"))
    result = subprocess.run([sys.executable, "-m", "mta.cli", "serve", "--config",
                             str(gateway.config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    busy = taken.getsockname()[1]
    taken.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (f"mailmoat: cannot listen on 127.0.0.1:{busy} (gateway.listen): "
            "Address already in use") in result.stderr
    assert "event=milter_process_stopped milter=ratelimit" in result.stderr  # no orphan
