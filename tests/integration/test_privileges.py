"""`serve` started as root binds a privileged port, then runs as `gateway.user`: serve, its
delivery process, its milters and their converters never hold root, and cannot get it back.
A milter started on its own as root (behind Postfix) does the same, or refuses to start."""
from __future__ import annotations

import email
import os
import pwd
import random
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from email import policy as email_policy
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import documents as docs
from tests.harness.milter_proc import ROOT, MilterProcess
from tests.harness.ports import LOOPBACK, port_is_open
from tests.harness.postfix import postfix_instance
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.harness.unprivileged import reachable_argv

pytestmark = pytest.mark.integration

USER = "nobody"
POLICY = """\
internal_networks: [192.0.2.0/24]
ratelimit:
  limits:
    - {name: per-ip, key: client_ip, per: message, rate: 100/hour, burst: 100}
neutralize:
  on_failure: tempfail
rules:
  - name: strangers
    when: {direction: inbound}
    then: {neutralize: neutralize}
"""


def free_low_port() -> int:
    """A port below 1024 free on 127.0.0.1 (only root, or CAP_NET_BIND_SERVICE, binds it)."""
    ports = list(range(600, 1000))
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 1024")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Not pytest's tmp_path: its parents are 0700, closed to the user serve becomes."""
    path = Path(tempfile.mkdtemp(prefix="mailmoat-priv-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(workdir: Path, port: int, user: str | None) -> Path:
    free = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free.append(probe.getsockname()[1])
    (workdir / "policy.yaml").write_text(POLICY)
    config = workdir / "gateway.yaml"
    config.write_text(
        f"gateway:\n  hostname: mx.mailmoat.test\n  listen: 127.0.0.1:{port}\n"
        f"  reinject_listen: 127.0.0.1:{free[0]}\n  metrics_listen: 127.0.0.1:{free[1]}\n"
        f"  relay_domains: [example.jp]\n  relay: {{default: \"maildir:maildir\"}}\n"
        + (f"  user: {user}\n" if user else "")
        + "store: sqlite:///var/state.db\npolicy: policy.yaml\n"
          "milters: [{name: ratelimit}, {name: neutralize}]\n")
    for path in (workdir / "policy.yaml", config):
        path.chmod(0o644)
    return config


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def wait_log(log: Path, needle: str, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while needle not in (text := log.read_text(errors="replace")):
        assert proc.poll() is None, f"serve exited:\n{text}"
        assert time.monotonic() < deadline, f"no {needle!r} in:\n{text}"
        time.sleep(0.1)
    return text


def pids(text: str, event: str) -> list[int]:
    return [int(line.split(" pid=", 1)[1].split()[0]) for line in text.splitlines()
            if f"event={event} " in line]


def test_serve_binds_a_low_port_as_root_then_runs_everything_as_the_user(
        workdir: Path) -> None:
    assert os.geteuid() == 0, "this test starts serve as root"
    user = pwd.getpwnam(USER)
    port = free_low_port()
    config = write_config(workdir, port, USER)
    log = workdir / "serve.log"
    argv = reachable_argv([sys.executable, "-m", "mta.cli", "serve", "--config", str(config)],
                          workdir)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        text = wait_log(log, "event=serve_started", proc)
        assert "event=privileges_dropped user=nobody" in text
        message = EmailMessage()
        message["From"], message["To"] = "a@outside.example", "taro@example.jp"
        message["Subject"] = "as nobody"
        message.set_content("see the picture")
        message.add_attachment(docs.png(workdir / "p.png").read_bytes(), maintype="image",
                               subtype="png", filename="p.png")
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.send_message(message)
        text = wait_log(log, "event=delivered", proc)
        [delivered] = (workdir / "maildir" / "taro@example.jp" / "new").iterdir()
        mail = email.message_from_bytes(delivered.read_bytes(), policy=email_policy.default)
        # The neutralize milter (running as nobody) had the picture converted in its jail.
        assert "converted=1" in str(mail["X-Mailmoat-Neutralized"]), delivered.read_text()

        everyone = {"serve": [proc.pid], "delivery": pids(text, "delivery_process_started"),
                    "milters": pids(text, "milter_process_started")}
        assert len(everyone["milters"]) == 2 and len(everyone["delivery"]) == 1
        for role, numbers in everyone.items():
            for pid in numbers:
                status = status_of(pid)
                # real, effective, saved and file-system ids: no way back to root.
                assert status["Uid"].split() == [str(user.pw_uid)] * 4, (role, status["Uid"])
                assert status["Gid"].split() == [str(user.pw_gid)] * 4, (role, status["Gid"])
                assert "0" not in status["Groups"].split(), (role, status["Groups"])
                assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
                assert status["NoNewPrivs"] == "1", role
        # What it writes belongs to the user; the config it reads stays root's.
        assert (workdir / "var" / "state.db").stat().st_uid == user.pw_uid
        assert config.stat().st_uid == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_serve_as_root_without_a_user_refuses_to_start(workdir: Path) -> None:
    config = write_config(workdir, free_low_port(), None)
    done = subprocess.run([sys.executable, "-m", "mta.cli", "serve", "--config", str(config)],
                          cwd=ROOT, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    said = done.stderr.decode()
    assert "serve runs as root: set gateway.user" in said, said
    assert "event=milter_process_started" not in said  # nothing was started as root


def test_a_user_that_cannot_reach_the_spool_is_a_clear_error(workdir: Path) -> None:
    closed = workdir / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    config = write_config(closed, free_low_port(), USER)
    done = subprocess.run(reachable_argv([sys.executable, "-m", "mta.cli", "serve", "--config",
                                          str(config)], workdir), cwd=ROOT,
                          capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    assert "is not usable by user nobody" in done.stderr.decode(), done.stderr.decode()


def assert_runs_as(pid: int, name: str, role: str) -> None:
    """Real, effective, saved and file-system ids all the user's; no capability; no way back."""
    user = pwd.getpwnam(name)
    status = status_of(pid)
    assert status["Uid"].split() == [str(user.pw_uid)] * 4, (role, status["Uid"])
    assert status["Gid"].split() == [str(user.pw_gid)] * 4, (role, status["Gid"])
    assert "0" not in status["Groups"].split(), (role, status["Groups"])
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, role
    assert status["NoNewPrivs"] == "1", role


def test_serve_user_on_the_command_line_overrides_gateway_user(workdir: Path) -> None:
    """`serve --user nobody` wins over the file's `user: root`: serve and the milters it
    starts (told --user by serve) run as nobody, not as root."""
    config = write_config(workdir, free_low_port(), "root")
    log = workdir / "serve.log"
    argv = reachable_argv([sys.executable, "-m", "mta.cli", "serve", "--config", str(config),
                           "--user", USER], workdir)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        text = wait_log(log, "event=serve_started", proc)
        assert "event=privileges_dropped user=nobody" in text
        assert "event=running_as_root" not in text
        milters = pids(text, "milter_process_started")
        assert len(milters) == 2
        for role, pid in [("serve", proc.pid), *(("milter", pid) for pid in milters)]:
            assert_runs_as(pid, USER, role)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(60)


RATELIMIT = """\
ratelimit:
  limits:
    - {name: per-ip, key: client_ip, per: message, rate: 1/hour, burst: 1}
  reply: "451 4.7.1 Slow down, said nobody"
"""


def milter_config(workdir: Path) -> Path:
    (workdir / "policy.yaml").write_text(RATELIMIT)
    config = workdir / "milter.yaml"
    # SQLite in a directory that does not exist yet: made, and handed to the user.
    config.write_text(f"store: sqlite:///{workdir}/var/state.db\npolicy: policy.yaml\n")
    for path in (workdir / "policy.yaml", config):
        path.chmod(0o644)
    return config


def test_a_milter_as_root_without_a_user_refuses_to_start(workdir: Path) -> None:
    port = free_low_port()
    done = subprocess.run([sys.executable, "-m", "mta.cli", "milter", "ratelimit", "--listen",
                           f"inet:{LOOPBACK}:{port}", "--config", str(milter_config(workdir))],
                          cwd=workdir, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    said = done.stderr.decode()
    assert done.returncode == 1, said
    assert "the ratelimit milter runs as root: set gateway.user" in said, said
    assert "or give --user USER" in said, said
    assert "event=milter_started" not in said and "Traceback" not in said
    assert not port_is_open(LOOPBACK, port)
    assert not (workdir / "var").exists()  # nothing made as root either


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


@pytest.mark.parametrize("where", ["port-below-1024", "unix-socket-in-roots-directory"])
def test_a_milter_started_as_root_opens_its_socket_then_serves_postfix_as_the_user(
        workdir: Path, sink: SmtpSink, where: str, tmp_path: Path) -> None:
    """Both sockets only root can make: the milter opens it, then drops to nobody before any
    mail, and a real Postfix (smtpd runs as user postfix) still gets its verdicts."""
    config = milter_config(workdir)
    if where == "port-below-1024":
        milter = MilterProcess("ratelimit", config, workdir, port=free_low_port(), user=USER)
    else:
        sockets = workdir / "sockets"  # root's, 0755: nobody could not create a file in it
        sockets.mkdir(mode=0o755)
        milter = MilterProcess("ratelimit", config, workdir, unix_path=sockets / "rl.sock",
                               user=USER)
    with milter, postfix_instance(tmp_path, relay_port=sink.port,
                                  smtpd_milters=milter.socket_spec) as postfix:
        assert milter.proc is not None
        milter.wait_for_log("event=milter_started")
        assert_runs_as(milter.proc.pid, USER, "milter")
        text = milter.log_text()
        assert text.index("event=milter_socket_opened") < text.index(
            "event=privileges_dropped user=nobody") < text.index("event=milter_started")

        def send() -> object:
            return run_swaks(postfix.smtp_port, mail_from="a@outside.example",
                             rcpt="taro@example.jp", xclient_addr="192.0.2.70",
                             header=["Subject: past a milter run by nobody"])
        first = send()
        assert first.code("DATA_END") == 250, first.transcript  # type: ignore[attr-defined]
        second = send()
        assert second.reply_by_stage["MAIL"] == (  # type: ignore[attr-defined]
            "451 4.7.1 Slow down, said nobody"), second.transcript  # type: ignore[attr-defined]
        assert len(sink.wait_for(1, timeout=20)) == 1
        nobody = pwd.getpwnam(USER)
        assert (workdir / "var" / "state.db").stat().st_uid == nobody.pw_uid
        if milter.unix_path is not None:
            made = milter.unix_path.stat()
            assert (made.st_uid, made.st_mode & 0o777) == (nobody.pw_uid, 0o666)
            assert milter.unix_path.parent.stat().st_uid == 0


def test_a_tls_key_the_user_cannot_read_is_a_clear_error(workdir: Path) -> None:
    """STARTTLS's key is read after the drop: a key only root can read stops serve at
    start with the setting's name, not with a traceback at the first connection."""
    from tests.harness.certs import TestCa
    (workdir / "ca").mkdir()
    cert, key = TestCa(workdir / "ca").issue("mx.mailmoat.test", "DNS:mx.mailmoat.test")
    key.chmod(0o600)  # root's alone
    cert.chmod(0o644)
    config = write_config(workdir, free_low_port(), USER)
    config.write_text(config.read_text().replace(
        "gateway:\n", f"gateway:\n  tls: {{cert: {cert}, key: {key}}}\n", 1))
    done = subprocess.run(reachable_argv([sys.executable, "-m", "mta.cli", "serve", "--config",
                                          str(config)], workdir), cwd=ROOT,
                          capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    said = done.stderr.decode()
    assert done.returncode != 0, said
    assert f"gateway.tls.key: {key} is not usable by user nobody" in said, said
    assert "Traceback" not in said, said
