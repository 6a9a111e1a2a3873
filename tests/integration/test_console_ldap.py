"""Console logins against a real OpenLDAP slapd (tests/harness/slapd.py): roles from groups,
wrong passwords, names that try to become filters or DNs, the empty-password trap, and a
directory that is down or hung."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from milters.core.config import ConsoleSettings, load_config
from milters.core.errors import LoginRefused, LoginThrottled
from milters.core.store import MemoryStore
from mta.console.accounts import set_account
from mta.console.login import authenticate
from tests.harness.bounded import bounded
from tests.harness.slapd import (ADMINS, AUDITORS, GROUPS, PASSWORDS, PEOPLE, READER_PW,
                                 TRAP_PW, Slapd)

IP = "127.0.0.1"


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    with Slapd() as server:
        yield server


def console(tmp_path: Path, slapd: Slapd, ldap: str) -> ConsoleSettings:
    (tmp_path / "reader.pass").write_text(READER_PW + "\n")
    (tmp_path / "reader.pass").chmod(0o600)
    config = tmp_path / "gw.yaml"
    config.write_text(f"console:\n  ldap:\n    url: {slapd.url}\n    timeout: 1s\n"
                      + "".join(f"    {line}\n" for line in ldap.strip().splitlines()))
    return load_config(config).console


ROLES = f"roles: {{admin: ['{ADMINS}'], auditor: ['{AUDITORS}'], user: '*'}}"
DIRECT = f"user_dn: 'uid={{name}},{PEOPLE}'\n{ROLES}"
SEARCH = (f"search_base: '{PEOPLE}'\nbind_dn: 'cn=reader,dc=example,dc=jp'\n"
          f"bind_password_file: reader.pass\ngroup_search_base: '{GROUPS}'\n"
          f"group_attribute: description\n{ROLES}")
MODES = {"direct bind, memberOf": DIRECT, "search, group search": SEARCH}


def login(settings: ConsoleSettings, name: str, password: str, store: object = None):
    return authenticate(settings, MemoryStore() if store is None else store,  # type: ignore
                        name, password, IP)


@pytest.mark.parametrize("mode", MODES)
def test_each_role_comes_from_the_groups(tmp_path: Path, slapd: Slapd, mode: str) -> None:
    settings = console(tmp_path, slapd, MODES[mode])
    alice = login(settings, "alice", PASSWORDS["alice"])
    assert (alice.role, alice.addresses) == ("admin", frozenset({"alice@example.jp"}))
    assert login(settings, "audrey", PASSWORDS["audrey"]).role == "auditor"
    assert login(settings, "carol", PASSWORDS["carol"]).role == "admin"  # the strongest wins
    bob = login(settings, "bob", PASSWORDS["bob"])
    assert (bob.role, bob.addresses) == ("user", frozenset({"bob@example.jp",
                                                            "bob.sales@example.jp"}))


def test_someone_in_no_mapped_group_cannot_log_in(tmp_path: Path, slapd: Slapd) -> None:
    settings = console(tmp_path, slapd, DIRECT.replace(", user: '*'", ""))
    with pytest.raises(LoginRefused, match="wrong name or password"):
        login(settings, "bob", PASSWORDS["bob"])
    assert login(settings, "alice", PASSWORDS["alice"]).role == "admin"


@pytest.mark.parametrize("mode", MODES)
def test_wrong_password_and_unknown_name_are_refused_alike(tmp_path: Path, slapd: Slapd,
                                                           mode: str) -> None:
    settings = console(tmp_path, slapd, MODES[mode])
    messages = set()
    for name, password in (("alice", "nope"), ("alice", PASSWORDS["bob"]),
                           ("nobody", "x"), ("ALICE", "nope")):
        with pytest.raises(LoginRefused) as info:
            login(settings, name, password)
        messages.add(str(info.value))
    assert messages == {"wrong name or password"}


INJECTIONS = ["*", "al*", "*)(uid=*", "alice)(uid=*", "alice)(|(uid=*)", "*)(|(objectClass=*",
              f"alice,{PEOPLE}", "admin,ou=x", "alice\\2a", "alice+cn=alice", "alice\x00",
              " alice", "uid=alice"]


@pytest.mark.parametrize("mode", MODES)
def test_names_that_look_like_filters_or_dns_log_in_as_nobody(tmp_path: Path, slapd: Slapd,
                                                              mode: str) -> None:
    settings = console(tmp_path, slapd, MODES[mode])
    for name in INJECTIONS:
        for password in (PASSWORDS["alice"], PASSWORDS["bob"], TRAP_PW):
            with pytest.raises(LoginRefused):
                actor = login(settings, name, password)
                pytest.fail(f"{name!r} logged in as {actor}")


@pytest.mark.parametrize("mode", MODES)
def test_an_empty_password_never_binds(tmp_path: Path, slapd: Slapd, mode: str) -> None:
    # RFC 4513 5.1.2: a DN with an empty password is an unauthenticated bind that "succeeds".
    settings = console(tmp_path, slapd, MODES[mode])
    for name in ("alice", "bob", "nobody"):
        with pytest.raises(LoginRefused) as info:
            login(settings, name, "")
        # refused before any bind (not by ldap3 or the server, which could differ)
        assert (str(info.value), info.value.reason) == ("wrong name or password",
                                                        "empty password")


def test_a_local_account_comes_first_and_ldap_logins_are_throttled(tmp_path: Path,
                                                                   slapd: Slapd) -> None:
    settings = console(tmp_path, slapd, DIRECT)
    set_account(settings.users_file, "alice", "auditor", [], "local-pw")
    assert login(settings, "alice", "local-pw").role == "auditor"
    with pytest.raises(LoginRefused):  # a local name never falls through to the directory
        login(settings, "alice", PASSWORDS["alice"])
    store = MemoryStore()
    for _ in range(5):
        with pytest.raises(LoginRefused):
            login(settings, "bob", "guess", store)
    with pytest.raises(LoginThrottled):
        login(settings, "bob", PASSWORDS["bob"], store)


def _bounded(settings: ConsoleSettings) -> BaseException | None:
    """Log in, the wait bounded (a hang fails the test)."""
    result = bounded(lambda: login(settings, "alice", PASSWORDS["alice"]),
                     what="the login on a dead directory")
    return result if isinstance(result, BaseException) else None


@pytest.mark.parametrize("mode", MODES)
def test_a_hung_or_stopped_directory_refuses_clearly(tmp_path: Path, mode: str) -> None:
    with Slapd() as server:
        settings = console(tmp_path, server, MODES[mode])
        assert _bounded(settings) is None
        server.pause()  # accepts TCP, answers nothing
        try:
            hung = _bounded(settings)
        finally:
            server.resume()
        assert isinstance(hung, LoginRefused) and "cannot be reached" in str(hung)
        server.stop()
        down = _bounded(settings)
        assert isinstance(down, LoginRefused) and "cannot be reached" in str(down)
        assert "directory unavailable" in down.reason


def test_a_world_readable_reader_password_file_refuses_clearly(tmp_path: Path, slapd: Slapd) -> None:
    settings = console(tmp_path, slapd, SEARCH)
    (tmp_path / "reader.pass").chmod(0o644)
    with pytest.raises(LoginRefused) as info:
        login(settings, "alice", PASSWORDS["alice"])
    assert "readable by every user" in info.value.reason
