"""Start a real `mailmoat milter NAME` process, as an admin would, and stop it with SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .ports import LOOPBACK, free_port, port_is_open
from .unprivileged import reachable_argv

ROOT = Path(__file__).resolve().parents[2]


class MilterProcess:
    """`mailmoat milter NAME --listen inet:127.0.0.1:PORT --config FILE`, logging to a file.

    A milter started as root must be told whom to become. The tests run as root, their
    files under pytest's tmp_path (0700) and their Python under /root/.pyenv, neither open
    to another user: so by default they say `--user root`, the explicit opt-out. With
    `user="nobody"` the milter drops for real (its files must then be readable by nobody;
    test_privileges.py does that)."""

    def __init__(self, name: str, config: Path | None, workdir: Path, *,
                 port: int | None = None, unix_path: Path | None = None,
                 env: dict[str, str] | None = None, user: str | None = None) -> None:
        self.name, self.config, self.workdir = name, config, workdir
        self.user = user if user is not None else ("root" if os.geteuid() == 0 else None)
        self.unix_path = unix_path
        self.port = None if unix_path else (port or free_port())
        self.log_path = workdir / f"{name}-{self.port or 'unix'}.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_spec(self) -> str:
        """As Postfix writes it in smtpd_milters."""
        return f"unix:{self.unix_path}" if self.unix_path else f"inet:{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mta.cli", "milter", self.name, "--listen", self.socket_spec]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        if self.user is not None:
            cmd += ["--user", self.user]
        if self.user not in (None, "root"):  # the user must reach our Python
            cmd = reachable_argv(cmd, self.workdir)
        return cmd

    def start(self, timeout: float = 15.0) -> "MilterProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log, stderr=log,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **self.env})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milter exited with {self.proc.returncode}:\n{self.log_text()}")
            if self._listening():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"milter did not listen within {timeout}s:\n{self.log_text()}")

    def _listening(self) -> bool:
        if self.unix_path:
            return self.unix_path.exists()
        return "milter_started" in self.log_text() and port_is_open(LOOPBACK, self.port or 0)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log_text())
            if match:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(f"log never matched {pattern!r}:\n{self.log_text()}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def __enter__(self) -> "MilterProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_config(directory: Path, policy_text: str, store: str = "memory://",
                 name: str = "config.yaml") -> Path:
    """A gateway config plus its policy file, side by side in `directory`."""
    policy = directory / f"{Path(name).stem}-policy.yaml"
    policy.write_text(policy_text)
    config = directory / name
    config.write_text(f"store: {store}\npolicy: {policy.name}\n")
    return config


def reinjecting_config(directory: Path, policy_text: str) -> tuple[Path, int]:
    """policy.yaml and config.yaml for milters behind Postfix whose copies and notices go
    back through Postfix's second smtpd: the config and that smtpd's free port."""
    from tests.harness.ports import free_port
    (directory / "policy.yaml").write_text(policy_text)
    reinject_port = free_port()
    config = directory / "config.yaml"
    config.write_text(f"gateway: {{hostname: mx.example.jp, reinject_listen: "
                      f"127.0.0.1:{reinject_port}}}\nstore: memory://\npolicy: policy.yaml\n")
    return config, reinject_port
