"""Console logins with local accounts (mta.console.login, accounts, throttle): roles, the
same refusal for unknown names and wrong passwords, and the Store throttle (the issue's
proof: the 6th wrong password in a minute is refused)."""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.config import ConsoleSettings, load_config
from milters.core.errors import ConfigError, LoginRefused, LoginThrottled
from milters.core.store import MemoryStore, SqliteStore
from mta import passwords
from mta.console.accounts import load_accounts, set_account
from mta.console.login import authenticate

ROOT = Path(__file__).resolve().parents[2]
IP = "192.0.2.7"


class Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def events() -> Iterator[Events]:
    logger = logging.getLogger("mailmoat")
    handler, old = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def settings(tmp_path: Path) -> ConsoleSettings:
    path = tmp_path / "console-users"
    set_account(path, "alice", "admin", [], "alice-pw")
    set_account(path, "audrey", "auditor", [], "audrey-pw")
    set_account(path, "bob@example.jp", "user", ["Bob.Sales@Example.JP"], "bob-pw")
    return ConsoleSettings(path)


def refused(settings: ConsoleSettings, store: object, name: str, password: str,
            source: str = IP, now: float = 1000.0) -> str:
    with pytest.raises(LoginRefused) as info:
        authenticate(settings, store, name, password, source, now=now)  # type: ignore[arg-type]
    return str(info.value)


# -- accounts and roles ------------------------------------------------------------------------
def test_each_role_logs_in_with_its_addresses(settings: ConsoleSettings) -> None:
    store = MemoryStore()
    alice = authenticate(settings, store, "alice", "alice-pw", IP, now=1000)
    assert (alice.name, alice.role, alice.source) == ("alice", "admin", IP)
    assert authenticate(settings, store, "audrey", "audrey-pw", IP, now=1000).role == "auditor"
    bob = authenticate(settings, store, "bob@example.jp", "bob-pw", IP, now=1000)
    # --address given: that address (lower-cased), not the name
    assert (bob.role, bob.addresses) == ("user", frozenset({"bob.sales@example.jp"}))


def test_unknown_name_and_wrong_password_read_the_same(settings: ConsoleSettings,
                                                       events: Events) -> None:
    store = MemoryStore()
    assert refused(settings, store, "alice", "wrong") == refused(settings, store, "nobody", "x")
    assert refused(settings, store, "Alice", "alice-pw") == "wrong name or password"
    assert refused(settings, store, "alice", "") == "wrong name or password"
    failed = [line for line in events.lines if "console_login_failed" in line]
    assert len(failed) == 4 and all(f"source={IP}" in line for line in failed)
    assert not any("alice-pw" in line for line in events.lines)  # never the password


def test_an_unknown_name_costs_one_full_scrypt(settings: ConsoleSettings,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = passwords.derive

    def counting(password: str, params: passwords.PasswordHash) -> bytes:
        calls.append((params.log2_n, params.r, params.p, len(params.key)))
        return real(password, params)

    monkeypatch.setattr(passwords, "derive", counting)
    store = MemoryStore()
    refused(settings, store, "nobody", "x")
    refused(settings, store, "ali\x00ce", "x")  # odd names too
    refused(settings, store, "a" * 5000, "x")
    authenticate(settings, store, "alice", "alice-pw", "192.0.2.99", now=1000)
    assert calls == [(14, 8, 1, 32)] * 4


def test_a_world_readable_accounts_file_is_refused(settings: ConsoleSettings,
                                                   events: Events) -> None:
    os.chmod(settings.users_file, 0o644)
    assert "wrong name or password" in refused(settings, MemoryStore(), "alice", "alice-pw")
    assert any("readable by every user" in line for line in events.lines)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_accounts(settings.users_file)


def test_a_broken_accounts_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "u"
    path.write_text("# accounts\nalice:root::$scrypt$x\nbob:user:not-an-address:"
                    + passwords.hash_password("x") + "\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_accounts(path)
    assert info.value.problems[0].startswith(f"{path}:2: account 'alice': role 'root'")
    assert info.value.problems[1].startswith(f"{path}:3: account 'bob': 'not-an-address'")


# -- throttling --------------------------------------------------------------------------------
def test_the_sixth_wrong_password_in_a_minute_is_refused_even_when_right(
        settings: ConsoleSettings, events: Events) -> None:
    store = MemoryStore()
    for second in range(5):
        refused(settings, store, "alice", "guess", now=1000 + second)
    with pytest.raises(LoginThrottled) as info:
        authenticate(settings, store, "alice", "alice-pw", IP, now=1006)
    assert 0 < info.value.retry_after <= 60
    assert any("console_login_throttled" in line and "name=alice" in line
               for line in events.lines)
    # Another address is throttled on the name too (a distributed guess at one account).
    with pytest.raises(LoginThrottled):
        authenticate(settings, store, "ALICE", "alice-pw", "198.51.100.1", now=1007)
    # A minute of quiet opens it again.
    assert authenticate(settings, store, "alice", "alice-pw", "198.51.100.2", now=1068).role


def test_a_password_spray_from_one_address_is_throttled(settings: ConsoleSettings) -> None:
    store = MemoryStore()
    for index in range(4):
        refused(settings, store, f"user{index}", "Summer2026!")
    # one right guess in the spray does not clear the address's count ...
    authenticate(settings, store, "alice", "alice-pw", IP, now=1000)
    refused(settings, store, "audrey", "Summer2026!")
    # ... so the next attempt, right or wrong, is refused.
    with pytest.raises(LoginThrottled):
        authenticate(settings, store, "audrey", "audrey-pw", IP, now=1001)


def test_an_ipv6_client_is_counted_per_slash_64(settings: ConsoleSettings) -> None:
    store = MemoryStore()
    for host in range(5):
        refused(settings, store, f"n{host}", "x", source=f"2001:db8:1:2::{host + 1}")
    with pytest.raises(LoginThrottled):
        authenticate(settings, store, "alice", "alice-pw", "2001:db8:1:2:ffff::9", now=1000)
    assert authenticate(settings, store, "alice", "alice-pw", "2001:db8:1:3::1", now=1000)


def test_a_parallel_burst_gets_no_more_than_five_guesses(tmp_path: Path,
                                                         settings: ConsoleSettings) -> None:
    store = SqliteStore(str(tmp_path / "state.db"))
    outcomes: list[str] = []
    lock = threading.Lock()

    def guess(index: int) -> None:
        try:
            authenticate(settings, store, "alice", f"guess{index}", IP, now=1000)
            result = "in"
        except LoginThrottled:
            result = "throttled"
        except LoginRefused:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert (outcomes.count("refused"), outcomes.count("throttled")) == (5, 15)
    store.close()


# -- the command line --------------------------------------------------------------------------
def mailmoat(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mta.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_user_add_role_list_delete(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("gateway:\n  auth: {users_file: var/users}\n")
    accounts = tmp_path / "var" / "console-users"
    added = mailmoat("user", "add", "alice", "--role", "admin", "--config", str(config),
                     stdin="alice pw\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout == f"console account alice: admin, no addresses, password set " \
                           f"({accounts})\n"
    assert stat.S_IMODE(accounts.stat().st_mode) == 0o600
    no_address = mailmoat("user", "add", "bob", "--role", "user", "--config", str(config),
                          stdin="pw\n")
    assert no_address.returncode == 2 and "--address" in no_address.stderr
    assert mailmoat("user", "add", "bob", "--role", "user", "--address", "Bob@Example.JP",
                    "--config", str(config), stdin="pw\n").returncode == 0
    assert mailmoat("user", "add", "taro", "--config", str(config), stdin="pw\n").returncode == 0
    listed = mailmoat("user", "list", "--config", str(config))
    assert listed.stdout == "taro\nalice\tconsole:admin\nbob\tconsole:user\tbob@example.jp\n"
    actor = authenticate(load_config(config).console, MemoryStore(), "alice", "alice pw", IP)
    assert actor.role == "admin"
    deleted = mailmoat("user", "delete", "bob", "--console", "--config", str(config))
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    assert list(load_accounts(accounts)) == ["alice"]
    bad_role = mailmoat("user", "add", "eve", "--role", "root", "--config", str(config))
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ldap, problem", [
    ("{url: ldap://127.0.0.1, roles: {admin: [cn=a]}}", "set user_dn"),
    ("{url: 'http://x', user_dn: 'uid={name}', roles: {user: '*'}}", "ldap://HOST"),
    ("{url: ldap://x, user_dn: 'uid=x', roles: {user: '*'}}", "{name} exactly once"),
    ("{url: ldap://x, user_dn: 'uid={name}{0}', roles: {user: '*'}}", "only {name}"),
    ("{url: ldap://x, user_dn: 'uid={name}', roles: {admin: ['cn=a,,']}}", "not a valid DN"),
    ("{url: ldap://x, user_dn: 'uid={name}', roles: {}}", "at least one"),
    ("{url: ldap://x, search_base: 'dc=x', bind_dn: 'cn=r', roles: {user: '*'}}",
     "bind_dn needs bind_password_file"),
    ("{url: ldap://x, user_dn: 'uid={name}', bind_password: pw, roles: {user: '*'}}",
     "console.ldap.bind_password: unknown key"),
])
def test_ldap_settings_are_checked(tmp_path: Path, ldap: str, problem: str) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(f"console:\n  ldap: {ldap}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert problem in str(info.value) and str(info.value).startswith(f"{config}:")
