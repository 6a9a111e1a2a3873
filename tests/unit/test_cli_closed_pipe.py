"""`mailmoat ... | head`: the reader gone before mailmoat writes. No traceback, the exit
status of a tool killed by SIGPIPE (141), like `seq 100000 | head -1`'s seq."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

POLICY = str(ROOT / "policies" / "inbound-gateway.yaml")


@pytest.mark.parametrize(("args", "status"), [
    (["--version"], 0), (["--help"], 0), (["policy", "check", POLICY], 141),
    (["policy", "test", POLICY], 141),
    (["policy", "explain", "--mail-from", "a@example.jp", "--rcpt", "b@example.com",
      "--policy", POLICY], 141),
], ids=["version", "help", "check", "test", "explain"])
def test_a_closed_pipe_ends_the_command_quietly(args: list[str], status: int) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before mailmoat starts: every write to it fails
    try:
        done = subprocess.run([sys.executable, "-m", "mta.cli", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT)
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == status
