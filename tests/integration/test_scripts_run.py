"""`scripts/run` as root: serve becomes the system user `mailmoat` when that user can run the
Python and read the checkout, and otherwise says why and stays root only by saying
`--user root`. The script runs from a copy of the checkout (its setup step stubbed: what it
installs is not under test) on a config of free ports, and is stopped once serve started.
Running it creates the system user `mailmoat` if the machine has none, as it does for an
admin."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.milter_proc import ROOT
from tests.harness.unprivileged import reachable_argv

pytestmark = pytest.mark.integration
RUN_USER = "mailmoat"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def checkout_copy(mode: int) -> Path:
    """scripts/run itself, the code it runs, and a setup that does nothing."""
    top = Path(tempfile.mkdtemp(prefix="mailmoat-run-"))
    (top / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "run", top / "scripts" / "run")
    (top / "scripts" / "setup").write_text("#!/bin/sh\nexit 0\n")
    (top / "scripts" / "setup").chmod(0o755)
    for name in ("mta", "milters", "policies", "pyproject.toml"):
        (top / name).symlink_to(ROOT / name)
    (top / ".venv").symlink_to((ROOT / ".venv").resolve())
    ports = free_ports(3)
    (top / "gateway.yaml").write_text(
        f"gateway:\n  hostname: mx.mailmoat.test\n  listen: 127.0.0.1:{ports[0]}\n"
        f"  reinject_listen: 127.0.0.1:{ports[1]}\n  metrics_listen: 127.0.0.1:{ports[2]}\n"
        f"  relay_domains: [example.jp]\n  relay: {{default: \"maildir:{top}/maildir\"}}\n"
        f"  queue: {{dir: {top}/spool}}\n  run_dir: {top}/run\n"
        f"store: sqlite:///{top}/var/state.db\npolicy: {ROOT}/policies/default.yaml\n")
    (top / "gateway.yaml").chmod(0o644)
    top.chmod(mode)
    return top


@pytest.fixture
def copies() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for top in made:
        shutil.rmtree(top, ignore_errors=True)


def run_until_started(argv: list[str], top: Path) -> str:
    """Start the script, wait for serve_started (or its exit), stop it; its whole output."""
    log = top / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd="/", stdout=out, stderr=out,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while "event=serve_started" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"scripts/run exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{log.read_text()}"
            time.sleep(0.1)
        return log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # scripts/run exec'd serve: this is serve
        proc.wait(60)


def test_as_root_it_runs_serve_as_mailmoat_when_that_user_can(copies: list[Path]) -> None:
    assert os.geteuid() == 0, "scripts/run's choice is root's"
    top = checkout_copy(0o755)
    copies.append(top)
    # Where this machine's Python is closed to other users, open the way to it (only in a
    # private mount namespace), as a system Python would be.
    text = run_until_started(reachable_argv([str(top / "scripts" / "run"), "--config",
                                             str(top / "gateway.yaml")], top), top)
    user = pwd.getpwnam(RUN_USER)  # made by the script if it was missing
    assert user.pw_shell == "/usr/sbin/nologin" and user.pw_uid < 1000
    assert f"event=privileges_dropped user={RUN_USER} uid={user.pw_uid}" in text, text
    assert "event=running_as_root" not in text and "staying root" not in text, text
    assert (top / "var" / "state.db").stat().st_uid == user.pw_uid


def test_as_root_it_says_why_and_stays_root_explicitly_when_mailmoat_cannot(
        copies: list[Path]) -> None:
    assert os.geteuid() == 0, "scripts/run's choice is root's"
    top = checkout_copy(0o700)  # the checkout is closed to every other user
    copies.append(top)
    text = run_until_started([str(top / "scripts" / "run"), "--config",
                              str(top / "gateway.yaml")], top)
    assert f"run: user {RUN_USER} cannot run" in text and "staying root (--user root)" in text
    assert "event=running_as_root key=gateway.user role=serve" in text, text
    assert "event=privileges_dropped" not in text, text
