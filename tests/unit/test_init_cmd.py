"""`mailmoat init`: each profile's files valid as written, nothing ever overwritten, and
the errors an operator can meet read as errors, not tracebacks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from milters.core.config import load_config
from mta.cli import read_policy
from mta.commands.init import PROFILES
from tests.conftest import ROOT


def mailmoat(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_profile_is_valid_as_written(tmp_path: Path, profile: str) -> None:
    where = tmp_path / "etc"
    done = mailmoat("init", str(where), "--profile", profile, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == [
        f"wrote {where / 'gateway.yaml'} ({PROFILES[profile].summary})",
        f"wrote {where / 'policy.yaml'} (from mailmoat's policies/{PROFILES[profile].policy})"]
    assert "Next steps:" in done.stdout
    config = load_config(where / "gateway.yaml")
    assert config.policy == where / "policy.yaml"  # beside the config, whatever the cwd
    assert config.store == f"sqlite:///{where}/var/state.db"
    check = mailmoat("policy", "check", str(where / "policy.yaml"), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    tested = mailmoat("policy", "test", str(where / "policy.yaml"), cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout
    assert tested.stdout.endswith(f"{len(read_policy(where / 'policy.yaml').tests)} passed, "
                                  "0 failed\n")
    # The policy's own "check me" comment names the file that was written, not the example.
    text = (where / "policy.yaml").read_text()
    assert f"policy check {where / 'policy.yaml'}" in text and "policies/" not in text


def test_the_default_profile_is_the_inbound_gateway_running_serve_milters(
        tmp_path: Path) -> None:
    assert mailmoat("init", str(tmp_path / "d"), cwd=tmp_path).returncode == 0
    config = load_config(tmp_path / "d" / "gateway.yaml")
    assert [m.name for m in config.milters] == ["ratelimit", "auth", "neutralize"]
    assert str(config.relay_default) == f"maildir:{tmp_path / 'd'}/var/maildir"


@pytest.mark.parametrize("existing", ["gateway.yaml", "policy.yaml"])
def test_init_never_overwrites_and_writes_nothing_then(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("mine\n")
    done = mailmoat("init", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == (f"mailmoat: {tmp_path / existing}: already exists; init never "
                           "overwrites (move it away or choose another directory)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_text() == "mine\n"


def test_a_dangling_symlink_is_not_written_through(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.yaml"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "policy.yaml").symlink_to(target)
    done = mailmoat("init", str(tmp_path / "d"), cwd=tmp_path)
    assert done.returncode == 1 and "already exists" in done.stderr
    assert not target.exists() and not (tmp_path / "d" / "gateway.yaml").exists()


def test_a_directory_that_cannot_be_made_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    done = mailmoat("init", str(tmp_path / "file"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"mailmoat: {tmp_path / 'file'}: cannot make the directory")
    assert "Traceback" not in done.stderr


def test_an_unknown_profile_is_a_usage_error(tmp_path: Path) -> None:
    done = mailmoat("init", str(tmp_path / "d"), "--profile", "outbound", cwd=tmp_path)
    assert done.returncode == 2 and "invalid choice: 'outbound'" in done.stderr
    assert not (tmp_path / "d").exists()


def test_version_is_the_package_version() -> None:
    import mta
    done = mailmoat("--version")
    assert done.returncode == 0 and done.stdout == f"mailmoat {mta.__version__}\n"
