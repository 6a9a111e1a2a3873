"""`role:ROLE` approvers: the addresses of the console accounts of that role, read from the
console's accounts file by milters/core/account_roles.py (never the password hashes)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from milters.core.account_roles import MAX_BYTES, role_addresses
from milters.core.errors import ConfigError
from mta.console.accounts import set_account


def test_the_role_s_addresses_come_in_file_order_each_once(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_account(path, "root", "admin", ["Root@Example.jp"], "pw-1-long-enough")
    set_account(path, "alice", "user", ["alice@example.jp"], "pw-2-long-enough")
    set_account(path, "bob", "admin", ["ops@example.jp"], "pw-3-long-enough")
    set_account(path, "carol", "admin", ["root@example.jp"], "pw-4-long-enough")
    assert role_addresses(path, "admin") == ["root@example.jp", "ops@example.jp"]
    assert role_addresses(path, "user") == ["alice@example.jp"]
    assert role_addresses(path, "auditor") == []


def test_odd_lines_are_skipped_and_a_missing_file_is_nobody(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# comment\n\nbroken line\nx:admin:a@b.jp\nevil:admin:a b@c.jp,ok@c.jp,"
                    "nodomain:$scrypt$x\n\xff:admin:z@z.jp:h\n", encoding="latin-1")
    os.chmod(path, 0o600)
    assert role_addresses(path, "admin") == ["ok@c.jp", "z@z.jp"]
    assert role_addresses(tmp_path / "absent", "admin") == []


def test_an_unreadable_or_huge_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        role_addresses(tmp_path, "admin")  # a directory
    path = tmp_path / "users"
    path.write_bytes(b"#" * (MAX_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        role_addresses(path, "admin")
