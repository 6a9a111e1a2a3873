"""`mailmoat scan` writes to the gateway's audit log only with --live-state: a trial scan
leaves neither its state nor any story behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.milter_proc import ROOT
from tests.integration.test_scan_state import POLICY, scan

pytestmark = pytest.mark.integration


def audit(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.cli", "audit", *args, "--config",
                           str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_scan_records_its_story_only_with_live_state(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "gateway.yaml"
    config.write_text("store: sqlite:///state.db\npolicy: policy.yaml\n")
    assert scan(config).returncode == 0
    assert not list(tmp_path.glob("*audit*"))
    assert scan(config, "--live-state").returncode == 0
    slowed = scan(config, "--live-state")
    assert slowed.returncode == 1, slowed.stdout + slowed.stderr
    found = audit(config, "search", "--event", "milter_verdict")
    lines = found.stdout.splitlines()
    assert any("milter=ratelimit" in line and "action=tempfail" in line for line in lines), \
        found.stdout + found.stderr
    assert audit(config, "verify").stdout.endswith("records, chain intact\n")
