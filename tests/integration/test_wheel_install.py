"""mailmoat as an operator installs it: the sdist and wheel built from this checkout, the
wheel installed into a fresh virtualenv in an empty directory, then `--version`, `init`,
`serve` on what init wrote, a message sent with swaks and found in the Maildir.

No checkout on the path: the virtualenv is new, the commands run from an empty directory
without PYTHONPATH, and the test checks where `mta` and `milters` are imported from. The
third-party dependencies (pymilter is compiled against libmilter) come from the project's
own virtualenv through a .pth line appended after the new site-packages: the wheel's own
files win, and a file the wheel forgot cannot be found in the checkout.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import mta
from tests.harness.milter_proc import ROOT
from tests.harness.ports import free_port
from tests.harness.swaks import run_swaks

pytestmark = pytest.mark.integration
RUN_AS = "root" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
SHIPPED_POLICIES = {"default.yaml", "inbound-gateway.yaml", "ppap-outbound.yaml",
                    "postfix-milters.yaml"}


@dataclass(frozen=True)
class Installed:
    dist: Path   # the sdist and the wheel
    venv: Path   # the fresh virtualenv the wheel went into
    empty: Path  # the working directory: nothing of mailmoat in it

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(self.venv / "bin" / "mailmoat"), *args], cwd=self.empty,
                              env=clean_env(), capture_output=True, text=True, timeout=120)
        assert not check or done.returncode == 0, done.stderr
        return done


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "MAILMOAT_EVENT_LOOP")}


def source_copy(to: Path) -> Path:
    """The files git would commit, as a clean checkout has them: no build/ or egg-info of an
    earlier build (its SOURCES.txt would smuggle in files the config forgot)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.exists() or source.is_symlink():  # not a file deleted but not yet staged
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name, follow_symlinks=False)
    return to


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    top = tmp_path_factory.mktemp("wheel")
    dist, venv, empty = top / "dist", top / "venv", top / "empty"
    empty.mkdir()
    # sdist first, then the wheel built from the unpacked sdist (build's default): a file
    # the sdist leaves out is missing from the wheel too. No isolation: no network needed.
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                            str(dist), str(source_copy(top / "src"))],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel = next(dist.glob("mailmoat-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   env=clean_env(), timeout=300)
    site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
         "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    ours = sysconfig.get_paths()
    (site / "zz-mailmoat-test-dependencies.pth").write_text(
        "\n".join(dict.fromkeys((ours["purelib"], ours["platlib"]))) + "\n")
    return Installed(dist, venv, empty)


def test_the_sdist_and_the_wheel_carry_the_policies_the_templates_and_the_license(
        installed: Installed) -> None:
    sdist = next(installed.dist.glob("mailmoat-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"LICENSE", "pyproject.toml"} <= names
    assert {f"milters/policies/{p}" for p in SHIPPED_POLICIES} <= names
    with zipfile.ZipFile(next(installed.dist.glob("mailmoat-*.whl"))) as whl:
        names = set(whl.namelist())
        metadata = whl.read(f"mailmoat-{mta.__version__}.dist-info/METADATA").decode()
    assert {f"milters/policies/{p}" for p in SHIPPED_POLICIES} <= names
    assert "milters/attachments/templates/password.ja.txt" in names
    assert "milters/core/review/templates/approve.ja.txt" in names
    assert f"mailmoat-{mta.__version__}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: MIT" in metadata.splitlines()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_the_installed_mailmoat_comes_from_the_virtualenv_not_the_checkout(
        installed: Installed) -> None:
    probe = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c",
         "import sys, mta, milters; print(mta.__file__); print(milters.__file__);"
         "print('\\n'.join(sys.path))"], cwd=installed.empty, env=clean_env(),
        capture_output=True, text=True, check=True)
    mta_file, milters_file, *path = probe.stdout.splitlines()
    assert Path(mta_file).is_relative_to(installed.venv)
    assert Path(milters_file).is_relative_to(installed.venv)
    assert not [p for p in path if p and Path(p).resolve() == ROOT.resolve()]
    assert installed.run("--version").stdout == f"mailmoat {mta.__version__}\n"


@pytest.fixture
def site(installed: Installed, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """`mailmoat init` (the default profile) as a new operator runs it; its output."""
    where = tmp_path / "site"
    done = installed.run("init", str(where))
    yield where, done.stdout


def set_ports(config: Path) -> int:
    """The ports init writes, made free ones (tests run side by side); serve as RUN_AS."""
    port = free_port()
    text = config.read_text()
    for old, new in ((":2525\n", f":{port}\n"), (":10026 ", f":{free_port()} "),
                     (":9781 ", f":{free_port()} "),
                     ("  # user: mailmoat ", f"  user: {RUN_AS}  #")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    config.write_text(text)
    return port


def test_init_then_serve_delivers_a_message_sent_with_swaks(
        installed: Installed, site: tuple[Path, str]) -> None:
    where, printed = site
    assert printed.startswith(f"wrote {where / 'gateway.yaml'} (inbound gateway")
    assert f"mailmoat serve --config {where / 'gateway.yaml'}" in printed
    check = installed.run("policy", "check", str(where / "policy.yaml"))
    assert check.stdout.startswith(f"{where / 'policy.yaml'}: ok (")
    port = set_ports(where / "gateway.yaml")
    log = where / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(installed.venv / "bin" / "mailmoat"), "serve", "--config",
                                 str(where / "gateway.yaml")], cwd=installed.empty,
                                env=clean_env(), stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while "event=serve_started" not in log.read_text():
            assert proc.poll() is None, f"serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{log.read_text()}"
            time.sleep(0.1)
        sent = run_swaks(port, mail_from="sender@example.jp", rcpt="postmaster@example.jp",
                         header=["Subject: installed from the wheel"])
        assert sent.code("DATA_END") == 250, sent.transcript
        deadline = time.monotonic() + 30
        while not (delivered := list((where / "var" / "maildir").glob("*/new/*"))):
            assert time.monotonic() < deadline, f"not delivered:\n{log.read_text()}"
            time.sleep(0.1)
        assert b"Subject: installed from the wheel" in delivered[0].read_bytes()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    assert status == 0, log.read_text()
    # A stopped gateway leaves no unix sockets behind for the next start to trip on.
    assert [p.name for p in (where / "var" / "run").iterdir() if p.is_socket()] == []
    assert not list(installed.empty.iterdir())  # everything went where the config says
