"""`mailmoat serve` and `mailmoat milter` inside the sandboxes packaging/systemd/'s units
describe.

systemd itself cannot run here (no systemd as PID 1 in this container), so the test builds
the unit's sandbox from the unit's own lines with the tools systemd uses underneath: the
process starts as User= (not root) with the capabilities of AmbientCapabilities= and
CapabilityBoundingSet= only, NoNewPrivileges, a read-only file system (ProtectSystem=strict)
in which only the unit's writable directories (ReadWritePaths=, StateDirectory=,
RuntimeDirectory=, moved into the test's directory) can be written, and a private /tmp
(PrivateTmp=). In it, serve must bind a port below 1024, run its milters, have the
neutralize milter's converter jail (bubblewrap under NoNewPrivileges) flatten a picture,
reload its policy on the unit's ExecReload signal, and stop on SIGTERM leaving no socket.
A milter in mailmoat-milter@.service's sandbox (no capability at all) must answer on its
socket in its RuntimeDirectory=, reload, and remove the socket when stopped.
"""
from __future__ import annotations

import configparser
import email
import os
import pwd
import grp
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import documents as docs
from tests.harness.milter_proc import ROOT
from tests.harness.unprivileged import reachable_argv
from tests.integration.test_privileges import free_low_port, pids, status_of, wait_log

pytestmark = pytest.mark.integration

UNITS = ROOT / "packaging" / "systemd"
USER = "nobody"  # stands in for the unit's User=mailmoat (sysusers makes that one)
CAP_NET_BIND_SERVICE = 10

# Inside a private mount namespace: the writable directories become mounts of their own,
# /tmp a fresh tmpfs, then every other mount is made read-only, then the program starts as
# the user with only the unit's capabilities. Arguments: the user, the group, the capabilities,
# the writable directories up to "--", then the command.
SANDBOX = r'''
set -e
user=$1; group=$2; caps=$3; keep=$4; hold=$5; shift 5
writable=""
while [ "$1" != "--" ]; do mount --bind "$1" "$1"; writable="$writable $1"; shift; done
shift
# A checkout under /tmp (CI clones there) stays reachable through the private /tmp, as an
# installed mailmoat outside /tmp would be.
if [ "$keep" != "-" ]; then mkdir -p "$hold"; mount --bind "$keep" "$hold"; fi
mount -t tmpfs -o mode=1777 private-tmp /tmp
if [ "$keep" != "-" ]; then mkdir -p "$keep"; mount --bind "$hold" "$keep"; fi
for point in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$point" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/tmp) continue ;; esac
  case " $writable " in *" $point "*) continue ;; esac
  mount -o remount,bind,ro "$point" 2>/dev/null || true
done
exec setpriv --reuid "$user" --regid "$group" --clear-groups --no-new-privs \
  --inh-caps "-all$caps" --ambient-caps "-all$caps" --bounding-set "-all$caps" -- "$@"
'''

POLICY = """\
internal_networks: [192.0.2.0/24]
neutralize:
  on_failure: tempfail
rules:
  - name: strangers
    when: {direction: inbound}
    then: {neutralize: neutralize}
"""


def unit_service(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser["Service"]


def setpriv_caps(unit_value: str) -> str:
    """`CAP_NET_BIND_SERVICE` -> `,+net_bind_service` (setpriv's spelling, after -all);
    an empty value keeps none."""
    return "".join(",+" + name.removeprefix("CAP_").lower() for name in unit_value.split())


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Outside /tmp (the sandbox gets a private one) and open to the unprivileged user."""
    path = Path(tempfile.mkdtemp(prefix="mailmoat-unit-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unit_dirs(workdir: Path) -> dict[str, Path]:
    """The unit's writable directories, moved into the test's directory, owned by the user
    as systemd (StateDirectory=, RuntimeDirectory=) and mailmoat.tmpfiles make them."""
    user = pwd.getpwnam(USER)
    dirs = {"state": workdir / "lib", "run": workdir / "run", "spool": workdir / "spool"}
    for path in dirs.values():
        path.mkdir(mode=0o750)
        os.chown(path, user.pw_uid, user.pw_gid)
    return dirs


def write_config(workdir: Path, dirs: dict[str, Path], port: int, *,
                 spool: Path | None = None) -> Path:
    from tests.harness.ports import free_port
    (workdir / "policy.yaml").write_text(POLICY)
    config = workdir / "gateway.yaml"
    config.write_text(
        f"gateway:\n  hostname: mx.mailmoat.test\n  listen: 127.0.0.1:{port}\n"
        f"  reinject_listen: 127.0.0.1:{free_port()}\n"
        f"  metrics_listen: 127.0.0.1:{free_port()}\n"
        "  relay_domains: [example.jp]\n"
        f"  relay: {{default: \"maildir:{dirs['state']}/maildir\"}}\n"
        f"  queue: {{dir: {spool or dirs['spool']}}}\n  run_dir: {dirs['run']}\n"
        f"store: sqlite:///{dirs['state']}/state.db\npolicy: {workdir}/policy.yaml\n"
        "milters: [{name: neutralize}]\n")
    return config


def sandboxed(unit: str, workdir: Path, writable: list[Path], arguments: list[str]
              ) -> list[str]:
    """`mailmoat ARGUMENTS` as the unit would start it, `writable` standing for the unit's
    writable directories."""
    service = unit_service(unit)
    assert service["User"] == "mailmoat" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["PrivateTmp"] == "yes"
    bounding = service["CapabilityBoundingSet"]
    assert service.get("AmbientCapabilities", "") in ("", bounding), "ambient beyond bounding"
    mailmoat = Path(sys.executable).parent / "mailmoat"
    under_tmp = ROOT.resolve().is_relative_to("/tmp")
    inner = ["sh", "-c", SANDBOX, "sh", USER, grp.getgrgid(pwd.getpwnam(USER).pw_gid).gr_name,
             setpriv_caps(service.get("AmbientCapabilities", "")),
             str(ROOT.resolve()) if under_tmp else "-", str(workdir / "checkout"),
             *map(str, writable), "--", str(mailmoat), *arguments]
    return reachable_argv(inner, workdir)


def serve_sandboxed(workdir: Path, dirs: dict[str, Path], config: Path) -> list[str]:
    service = unit_service("mailmoat.service")
    assert service["AmbientCapabilities"] == service["CapabilityBoundingSet"] == \
        "CAP_NET_BIND_SERVICE"
    # The unit's writable places, each standing for one of ours.
    assert service["ReadWritePaths"] == "/var/spool/mailmoat"
    assert service["StateDirectory"] == "mailmoat" and service["RuntimeDirectory"] == "mailmoat"
    return sandboxed("mailmoat.service", workdir, [dirs["state"], dirs["run"], dirs["spool"]],
                     ["serve", "--config", str(config)])


def start(argv: list[str], workdir: Path, dirs: dict[str, Path]) -> subprocess.Popen[bytes]:
    log = workdir / "serve.log"
    out = open(log, "wb")
    # WorkingDirectory=/var/lib/mailmoat: the state directory.
    return subprocess.Popen(argv, cwd=dirs["state"], stdout=out, stderr=out,
                            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


def picture_message(workdir: Path) -> EmailMessage:
    message = EmailMessage()
    message["From"], message["To"] = "a@outside.example", "taro@example.jp"
    message["Subject"] = "in the unit's sandbox"
    message.set_content("see the picture")
    message.add_attachment(docs.png(workdir / "p.png").read_bytes(), maintype="image",
                           subtype="png", filename="p.png")
    return message


def test_serve_runs_in_the_units_sandbox(workdir: Path) -> None:
    assert os.geteuid() == 0, "the test builds the sandbox as root, as systemd does"
    dirs = unit_dirs(workdir)
    port = free_low_port()
    config = write_config(workdir, dirs, port)
    proc = start(serve_sandboxed(workdir, dirs, config), workdir, dirs)
    log = workdir / "serve.log"
    try:
        text = wait_log(log, "event=serve_started", proc)
        # Started as the user already: nothing to drop, and a low port bound all the same.
        assert "event=privileges_dropped" not in text
        status = status_of(proc.pid)
        user = pwd.getpwnam(USER)
        assert status["Uid"].split() == [str(user.pw_uid)] * 4
        assert status["NoNewPrivs"] == "1"
        # serve keeps the one bounding capability; it handed its ambient set to nobody.
        assert int(status["CapBnd"], 16) == 1 << CAP_NET_BIND_SERVICE
        assert int(status["CapAmb"], 16) == 0

        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.send_message(picture_message(workdir))
        text = wait_log(log, "event=delivered", proc)
        [delivered] = (dirs["state"] / "maildir" / "taro@example.jp" / "new").iterdir()
        mail = email.message_from_bytes(delivered.read_bytes(), policy=email_policy.default)
        # The converter ran in bubblewrap's jail under NoNewPrivileges, as the user.
        assert "converted=1" in str(mail["X-Mailmoat-Neutralized"]), delivered.read_text()

        children = pids(text, "delivery_process_started") + pids(text, "milter_process_started")
        assert len(children) == 2, text
        for pid in children:
            child = status_of(pid)
            assert child["Uid"].split() == [str(user.pw_uid)] * 4, pid
            assert int(child["CapEff"], 16) == 0 and int(child["CapAmb"], 16) == 0, pid
            assert child["NoNewPrivs"] == "1", pid

        # ExecReload=/bin/kill -HUP $MAINPID
        (workdir / "policy.yaml").write_text(POLICY.replace("strangers", "outsiders"))
        os.kill(proc.pid, signal.SIGHUP)
        wait_log(log, "event=policy_reloaded", proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # KillMode=mixed: SIGTERM to serve alone
        status_code = proc.wait(90)
    assert status_code == 0, log.read_text()
    assert not [p for p in dirs["run"].rglob("*") if p.is_socket()], list(dirs["run"].rglob("*"))
    # Everything it wrote is the user's and inside the writable directories.
    uid = pwd.getpwnam(USER).pw_uid
    written = [p for d in dirs.values() for p in d.rglob("*")]
    assert written and all(p.stat().st_uid == uid for p in written), written


def test_a_spool_outside_the_units_writable_paths_is_a_clear_error(workdir: Path) -> None:
    """The unit's comment says where a config keeps its state; a config that puts the spool
    elsewhere meets a read-only file system and says so instead of failing later."""
    dirs = unit_dirs(workdir)
    elsewhere = workdir / "spool-elsewhere"
    elsewhere.mkdir()
    user = pwd.getpwnam(USER)
    os.chown(elsewhere, user.pw_uid, grp.getgrgid(user.pw_gid).gr_gid)
    config = write_config(workdir, dirs, free_low_port(), spool=elsewhere)
    proc = start(serve_sandboxed(workdir, dirs, config), workdir, dirs)
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    said = (workdir / "serve.log").read_text()
    assert code != 0, said
    assert f"gateway.queue.dir: {elsewhere} is on a read-only file system" in said, said
    assert "Traceback" not in said, said


def test_a_milter_runs_in_the_milter_units_sandbox(workdir: Path) -> None:
    from mta.chain.client import MilterEndpoint
    from mta.gateway.health import milter_problem
    service = unit_service("mailmoat-milter@.service")
    assert service["CapabilityBoundingSet"] == "" and "AmbientCapabilities" not in service
    assert service["RuntimeDirectory"] == "mailmoat-milter/%i"
    dirs = unit_dirs(workdir)
    instance = dirs["run"] / "auth"  # RuntimeDirectory=mailmoat-milter/%i
    instance.mkdir(mode=0o750)
    os.chown(instance, pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid)
    socket_path = instance / "auth.sock"
    config = write_config(workdir, dirs, free_low_port())
    argv = sandboxed("mailmoat-milter@.service", workdir, [dirs["state"], instance],
                     ["milter", "auth", "--listen", f"unix:{socket_path}", "--config",
                      str(config)])
    proc = start(argv, workdir, dirs)
    log = workdir / "serve.log"
    try:
        wait_log(log, "event=milter_started", proc)
        status = status_of(proc.pid)
        assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        assert socket_path.is_socket() and socket_path.stat().st_uid == pwd.getpwnam(USER).pw_uid
        assert milter_problem(MilterEndpoint("auth", f"unix:{socket_path}")) is None
        os.kill(proc.pid, signal.SIGHUP)  # ExecReload
        wait_log(log, "event=policy_reloaded", proc)
        assert milter_problem(MilterEndpoint("auth", f"unix:{socket_path}")) is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()
    assert not socket_path.exists()


def test_the_console_runs_in_the_console_units_sandbox(workdir: Path) -> None:
    import httpx
    from tests.harness.ports import free_port
    service = unit_service("mailmoat-console.service")
    assert service["CapabilityBoundingSet"] == "" and "AmbientCapabilities" not in service
    assert service["ReadWritePaths"] == "/var/spool/mailmoat"
    dirs = unit_dirs(workdir)
    port = free_port()
    config = write_config(workdir, dirs, free_low_port())
    config.write_text(config.read_text() + f"console:\n  listen: '127.0.0.1:{port}'\n"
                      f"  secret_key_file: {dirs['state']}/console-secret\n"
                      f"  users_file: {dirs['state']}/console-users\n")
    argv = sandboxed("mailmoat-console.service", workdir, [dirs["state"], dirs["spool"]],
                     ["console", "--config", str(config)])
    proc = start(argv, workdir, dirs)
    log = workdir / "serve.log"
    try:
        wait_log(log, "event=console_started", proc)
        status = status_of(proc.pid)
        assert int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"] == "1"
        page = httpx.get(f"http://127.0.0.1:{port}/login", timeout=10)
        assert page.status_code == 200 and "csrf" in page.text
        key = dirs["state"] / "console-secret"  # made on first start, in StateDirectory=
        assert key.stat().st_mode & 0o777 == 0o600
        assert key.stat().st_uid == pwd.getpwnam(USER).pw_uid
        os.kill(proc.pid, signal.SIGHUP)  # ExecReload: no TLS here, but alive after it
        wait_log(log, "event=console_reloaded", proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()
