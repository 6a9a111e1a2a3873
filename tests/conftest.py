"""Shared fixtures: a controllable clock and policy builders."""
from __future__ import annotations

import subprocess
import textwrap
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from milters.core.policy.document import Policy, load_policy_text
from mta.cli import EXTENSIONS
from tests.harness.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server on loopback for the whole run (tests clean their own keys)."""
    with RedisServer() as server:
        yield server


class Clock:
    """A clock the test moves by hand: decay and draining without sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_policy(text: str, source: str = "test.yaml") -> Policy:
    return load_policy_text(textwrap.dedent(text), EXTENSIONS, source)


@pytest.fixture
def policy_from() -> Callable[[str], Policy]:
    return make_policy


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem (tmpfs), so the kernel itself says ENOSPC."""
    mount = Path("/tmp") / f"mailmoat-full-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()
