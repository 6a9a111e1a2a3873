"""Real milters shared by the integration tests: the every-action pymilter and OpenDKIM."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.milter_proc import ROOT
from tests.harness.ports import LOOPBACK, free_port, wait_for_port


def _listening(command: list[str], port: int) -> Iterator[int]:
    """Run a milter process until the test is done; yields its TCP port once it listens."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(LOOPBACK, port, timeout=10)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _action_milter() -> Iterator[int]:
    port = free_port()
    yield from _listening([sys.executable, "-m", "tests.harness.action_milter",
                           f"inet:{port}@127.0.0.1"], port)


@pytest.fixture(scope="module")
def action_milter() -> Iterator[int]:
    yield from _action_milter()


@pytest.fixture(scope="module")
def second_action_milter() -> Iterator[int]:
    """Another instance, for chains that need two."""
    yield from _action_milter()


OPENDKIM_CONF = """\
Syslog                  no
Mode                    v
AuthservID              mx.mailmoat.test
AlwaysAddARHeader       yes
Socket                  inet:{port}@127.0.0.1
PidFile                 {dir}/opendkim.pid
UserID                  opendkim
"""


@pytest.fixture
def opendkim(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "opendkim.conf"
    conf.write_text(OPENDKIM_CONF.format(port=port, dir=tmp_path))
    tmp_path.chmod(0o755)
    yield from _listening(["/usr/sbin/opendkim", "-f", "-x", str(conf)], port)


