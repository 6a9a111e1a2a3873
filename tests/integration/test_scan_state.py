"""`mailmoat scan` leaves the running gateway's state alone unless told (--live-state): a
scan from an outside IP must not eat into that IP's rate limits."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.milter_proc import ROOT
from tests.integration.test_serve import RUN_AS

pytestmark = pytest.mark.integration
POLICY = """\
ratelimit:
  limits:
    - {name: per-ip, key: client_ip, per: message, rate: 1/hour, burst: 1}
  reply: "451 4.7.1 Slow down from scan"
"""


def scan(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.cli", "scan",
                           str(ROOT / "samples" / "plain-en.eml"), "--client-ip", "192.0.2.9",
                           "--config", str(config), "--user", RUN_AS, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_scan_counts_against_the_store_only_with_live_state(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "gateway.yaml"
    config.write_text("store: sqlite:///state.db\npolicy: policy.yaml\n")
    for _ in range(2):  # a burst of 1: the second would be slowed down if it counted
        done = scan(config)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("verdict: accept")
    assert not (tmp_path / "state.db").exists()
    first, second = scan(config, "--live-state"), scan(config, "--live-state")
    assert first.stdout.startswith("verdict: accept"), first.stdout + first.stderr
    assert second.returncode == 1
    assert "451 4.7.1 Slow down from scan" in second.stdout
