"""A hostile converter, run by the real neutralize milter process inside the real jail.

The payload stands where LibreOffice stands (the policy's `soffice` program), so it runs in
exactly the sandbox a hostile document would get: bwrap's view, the worker's rlimits, the
converter's user. It tries to read secrets, write outside its directory, fork without limit
and reach sockets, and reports what happened on stderr, which the note quotes back."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import documents as docs
from tests.integration.test_neutralize_convert import (BASE, STRANGER, fake_office,
                                                       host_processes, mail, note_of)

pytestmark = pytest.mark.integration

SECRET = "hunter2-redis-password"
FORK_LIMIT = 24  # limits.processes in the test policy
FORK_TRIES = 200  # the payload's bound: far above the limit, still harmless if it held

HOSTILE = """
import errno, glob, json, os, socket, sys, time
SECRET, ROOT_FILE, CONFIG_FILE, SPOOL, PORT, ABSTRACT, UNIX, TRIES = ARGUMENTS
here = os.getcwd()
r = {}
def err(exc):
    return "E" + errno.errorcode.get(exc.errno, str(exc.errno))
def read(key, path):
    try:
        r[key] = "HIT" if SECRET in open(path, errors="replace").read() else "read"
    except OSError as exc:
        r[key] = err(exc)
def write(key, path):
    try:
        with open(path, "w") as out:
            out.write("x")
        r[key] = "WROTE"
    except OSError as exc:
        r[key] = err(exc)
def connect(key, family, address):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(address)
        r[key] = "CONNECTED"
    except OSError as exc:
        r[key] = err(exc) if exc.errno else "timeout"
read("rf", ROOT_FILE)
read("cf", CONFIG_FILE)
read("p1", "/proc/1/environ")
r["ev"] = "HIT" if any(SECRET in v for v in os.environ.values()) else "clean"
r["pe"] = "clean"
for path in glob.glob("/proc/[0-9]*/environ"):
    try:
        if SECRET in open(path, errors="replace").read():
            r["pe"] = "HIT"
    except OSError:
        pass
write("wt", "/tmp/hostile-was-here")
write("ws", os.path.join(SPOOL, "hostile-was-here"))
write("wp", os.path.join(os.path.dirname(here), "hostile-was-here"))
write("wr", "/hostile-was-here")
connect("tc", socket.AF_INET, ("127.0.0.1", int(PORT)))
connect("ab", socket.AF_UNIX, "\\0" + ABSTRACT)
connect("us", socket.AF_UNIX, UNIX)
r["ms"] = len(glob.glob("/tmp/mailmoat-scan-*/*.sock") + glob.glob("/run/*") + glob.glob("/var/spool/*"))
children = []
r["fk"] = "no limit"
for n in range(TRIES):
    try:
        pid = os.fork()
    except OSError as exc:
        r["fk"] = f"{err(exc)}@{n}"
        break
    if pid == 0:
        os.close(1); os.close(2)
        time.sleep(60)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
print("REPORT" + json.dumps(r, separators=(",", ":")), file=sys.stderr)
sys.exit(1)
"""


@pytest.fixture
def root_secret() -> Path:
    path = Path("/root") / f"mailmoat-test-secret-{os.getpid()}"
    path.write_text(f"password: {SECRET}\n")
    path.chmod(0o600)
    yield path
    path.unlink(missing_ok=True)


def test_a_hostile_converter_can_do_nothing_outside_its_directory(
        tmp_path: Path, root_secret: Path) -> None:
    Path("/tmp/hostile-was-here").unlink(missing_ok=True)  # an earlier failed run's
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    password_file = config_dir / "redis-password"
    password_file.write_text(SECRET + "\n")
    password_file.chmod(0o600)
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o777)
    spool.chmod(0o777)  # even a spool anyone may write to stays out of reach
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.setblocking(False)
    abstract = socket.socket(socket.AF_UNIX)
    abstract_name = f"mailmoat-test-{os.getpid()}"
    abstract.bind("\0" + abstract_name)
    abstract.listen(5)
    abstract.setblocking(False)
    unix_path = tmp_path / "milter.sock"  # as a milter's socket would be
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(unix_path))
    unix_path.chmod(0o777)
    unix.listen(5)
    unix.setblocking(False)

    arguments = (SECRET, str(root_secret), str(password_file), str(spool),
                 listener.getsockname()[1], abstract_name, str(unix_path), FORK_TRIES)
    script = fake_office(tmp_path, HOSTILE.replace("ARGUMENTS", repr(arguments)))
    document = docs.docx(tmp_path / "a.docx", ["x"])
    (tmp_path / "m.eml").write_bytes(mail([("a.docx", document.read_bytes(),
                                            "application/octet-stream")]))
    extra = (f"  soffice: {script}\n  limits: {{wall: 60s, processes: {FORK_LIMIT}}}")
    (config_dir / "policy.yaml").write_text(BASE.format(extra=extra, action="neutralize"))
    (config_dir / "config.yaml").write_text(
        "gateway: {hostname: mx.example.jp}\nmilters: [{name: neutralize}]\n"
        "policy: policy.yaml\nstore: memory://\n")
    # The milter's environment carries a secret, as a Redis password variable would.
    env = {**os.environ, "MAILMOAT_TEST_SECRET": SECRET,
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        done = subprocess.run([sys.executable, "-m", "mta.cli", "scan", str(tmp_path / "m.eml"),
                               "--config", str(config_dir / "config.yaml"),
                               "--client-ip", STRANGER, "--mail-from", "sender@outside.example",
                               "--rcpt", "taro@example.jp", "--out", str(tmp_path / "out.eml"),
                               # The milter stays root (it says so): the jail's own switch
                               # to nobody is what this test attacks.
                               "--user", "root"],
                              capture_output=True, env=env, timeout=180)
        assert done.returncode == 0, done.stderr.decode()
        for server in (listener, abstract, unix):
            with pytest.raises(BlockingIOError):
                server.accept()  # nothing from the jail ever arrived
    finally:
        for server in (listener, abstract, unix):
            server.close()
    note = note_of((tmp_path / "out.eml").read_bytes())
    assert "REPORT" in note, note
    report = json.loads(note.split("REPORT", 1)[1].split("}", 1)[0] + "}")
    print("what the hostile converter saw:", report)

    # Secrets: the files are not in its world, pid 1 is not readable, the environment is empty.
    assert report["rf"] == "EENOENT" and report["cf"] == "EENOENT"
    assert report["p1"] in ("EEACCES", "read")  # bwrap's pid 1: nothing of ours in it
    assert report["ev"] == "clean" and report["pe"] == "clean"
    # Writes: outside its directory the file system is read-only or absent.
    assert report["wt"] in ("EEROFS", "EENOENT") and report["wr"] == "EEROFS"
    assert report["ws"] in ("EEROFS", "EENOENT") and report["wp"] in ("EEROFS", "EENOENT")
    for leftover in (Path("/tmp/hostile-was-here"), spool / "hostile-was-here",
                     Path("/hostile-was-here")):
        assert not leftover.exists()
    # Sockets: its own network namespace, no host paths, no other unix sockets to find.
    assert report["tc"] in ("EECONNREFUSED", "EENETUNREACH")
    assert report["ab"] == "EECONNREFUSED"
    assert report["us"] == "EENOENT" and report["ms"] == 0
    # Fork: stopped by the process limit, far below the payload's own bound.
    assert report["fk"].startswith("EEAGAIN@"), report["fk"]
    assert int(report["fk"].split("@")[1]) < FORK_LIMIT
    # The host is fine: nothing of the jail is left, and we can still start processes.
    assert host_processes(str(script)) == []
    assert subprocess.run(["true"], timeout=10).returncode == 0
