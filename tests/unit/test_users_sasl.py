"""SMTP AUTH building blocks: the scrypt users file (mta.smtp_in.users), SASL PLAIN/LOGIN decoding
(mta.smtp_in.sasl), the gateway.auth.users_file setting and `mailmoat user add|delete|list`."""
from __future__ import annotations

import base64
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.config import load_config
from milters.core.errors import ConfigError, MailmoatError
from mta import passwords
from mta.smtp_in import sasl
from mta.smtp_in.sasl import SaslError
from mta.smtp_in.users import UserFile, hash_password, list_users, remove_user, set_password
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def private_files() -> Iterator[None]:
    """Users files written here are private (0600), as `mailmoat user add` writes them: one
    readable by every user is refused (test_a_users_file_readable_by_everyone_is_refused)."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_a_users_file_readable_by_everyone_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"taro:{hash_password('s3cret')}\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by every user"):
        UserFile(path)
    path.chmod(0o640)
    assert UserFile(path).verify("taro", "s3cret")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Events(logging.Handler):
    """Collects mailmoat's event lines (the logger does not propagate once set up)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def events() -> Iterator[Events]:
    logger = logging.getLogger("mailmoat")
    handler, old_level = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# -- hashing and verification -------------------------------------------------------------------
def test_hash_has_the_documented_format_and_a_fresh_salt() -> None:
    first, second = hash_password("s3cret"), hash_password("s3cret")
    pattern = r"\$scrypt\$ln=14,r=8,p=1\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
    match = re.fullmatch(pattern, first)
    assert match, first
    salt, key = (base64.b64decode(part + "=" * (-len(part) % 4)) for part in match.groups())
    assert (len(salt), len(key)) == (16, 32)
    assert first != second  # random salt


def test_verify_accepts_the_password_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"taro:{hash_password('s3cret')}\nhanako:{hash_password('pässwörd')}\n")
    user_file = UserFile(path)
    assert user_file.verify("taro", "s3cret")
    assert user_file.verify("hanako", "pässwörd")
    assert not user_file.verify("taro", "s3cret ")
    assert not user_file.verify("taro", "pässwörd")  # another user's password
    assert not user_file.verify("Taro", "s3cret")  # names are case-sensitive
    assert not user_file.verify("taro", "")


def test_a_hash_made_independently_with_hashlib_verifies(tmp_path: Path) -> None:
    import hashlib
    salt = b"0123456789abcdef"
    key = hashlib.scrypt(b"s3cret", salt=salt, n=2**14, r=8, p=1, dklen=32)
    line = f"taro:$scrypt$ln=14,r=8,p=1${b64(salt)}${b64(key)}\n"  # padded base64 is fine too
    (tmp_path / "users").write_text(line)
    assert UserFile(tmp_path / "users").verify("taro", "s3cret")


def test_unknown_user_is_refused_after_the_same_scrypt_work(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    path.write_text(f"taro:{hash_password('s3cret')}\n")
    user_file = UserFile(path)
    calls = []
    real = passwords.derive

    def counting(password: str, params: passwords.PasswordHash) -> bytes:
        calls.append((params.log2_n, params.r, params.p, len(params.key)))
        return real(password, params)

    monkeypatch.setattr(passwords, "derive", counting)
    assert not user_file.verify("nobody", "s3cret")
    assert not user_file.verify("nobody", "")
    assert user_file.verify("taro", "s3cret")
    # One full-cost scrypt for the unknown user, with the real parameters: no timing oracle.
    assert calls == [(14, 8, 1, 32)] * 3


def test_blank_lines_and_comments_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# SMTP AUTH users\n\n   \ntaro:{hash_password('a')}\r\n  # indented\n")
    assert UserFile(path).names == ["taro"]
    assert list_users(path) == ["taro"]


@pytest.mark.parametrize("line, problem", [
    ("taro", "expected NAME:$scrypt$"),
    ("taro:$2b$12$abcdefghijklmnopqrstuv", "the hash is not $scrypt$"),
    ("taro:$bcrypt$ln=14,r=8,p=1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5", "unsupported hash scheme"),
    ("taro:$scrypt$ln=14,r=8$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5", "ln=N,r=R,p=P"),
    ("taro:$scrypt$ln=40,r=8,p=1$c2FsdHNhbHRzYWx0$a2V5a2V5a2V5a2V5a2V5", "out of range"),
    ("taro:$scrypt$ln=14,r=8,p=1$!!!$a2V5a2V5a2V5a2V5a2V5", "not base64"),
    ("ta\x01ro:{hash}", "control characters"),
    ("hanako:{hash}", "appears again (first on line 2)"),
])
def test_a_broken_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "users"
    good = hash_password("a")
    path.write_text(f"# users\nhanako:{good}\n\n{line.format(hash=good)}\n")
    with pytest.raises(ConfigError) as info:
        UserFile(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}:4: "), info.value.problems
    assert problem in info.value.problems[0]
    assert good.split("$")[-1] not in str(info.value)  # never echo a hash


def test_every_broken_line_is_reported_at_once_and_non_utf8_too(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"bad one\n\xff\xfe:x\nbad two\n")
    with pytest.raises(ConfigError) as info:
        UserFile(path)
    assert info.value.problems == [f"{path}:2: not UTF-8 text"]
    path.write_text("bad one\nok:\nbad two\n")
    with pytest.raises(ConfigError) as info:
        UserFile(path)
    assert [p.split(": ")[0] for p in info.value.problems] == [f"{path}:{n}" for n in (1, 2, 3)]


def test_a_missing_file_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        UserFile(tmp_path / "nope")
    assert str(tmp_path / "nope") in info.value.problems[0]
    assert list_users(tmp_path / "nope") == []


def test_an_edit_takes_effect_without_restart(tmp_path: Path, events: Events) -> None:
    path = tmp_path / "users"
    set_password(path, "taro", "old")
    user_file = UserFile(path)
    assert user_file.verify("taro", "old")
    set_password(path, "taro", "new")
    set_password(path, "hanako", "hers")
    assert user_file.verify("taro", "new")
    assert not user_file.verify("taro", "old")
    assert user_file.verify("hanako", "hers")
    assert remove_user(path, "hanako")
    assert not user_file.verify("hanako", "hers")
    assert any(line.startswith("event=users_reloaded") for line in events.lines)


def test_a_broken_edit_keeps_the_last_good_users(tmp_path: Path, events: Events) -> None:
    path = tmp_path / "users"
    set_password(path, "taro", "s3cret")
    user_file = UserFile(path)
    good_text = path.read_text()
    path.write_text(good_text.replace("taro", "hanako") + "garbage line\n")
    assert user_file.verify("taro", "s3cret")  # the broken file did not replace the users
    assert not user_file.verify("hanako", "s3cret")
    failed = [line for line in events.lines if line.startswith("event=users_reload_failed")]
    assert len(failed) == 1  # reported once, not at every login
    assert f"file={path}" in failed[0] and "problems=1" in failed[0]
    assert any(f"{path}:2:" in line for line in events.lines if "users_problem" in line)
    path.unlink()
    assert user_file.verify("taro", "s3cret")  # a vanished file is a broken edit too
    path.write_text(good_text.replace("taro", "hanako"))  # fixed: now it takes effect
    assert user_file.verify("hanako", "s3cret")
    assert not user_file.verify("taro", "s3cret")


# -- writing ------------------------------------------------------------------------------------
def test_set_password_replaces_in_place_keeps_comments_and_0600(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# who may relay\ntaro:{hash_password('one')}\n# end\n")
    path.chmod(0o644)
    set_password(path, "taro", "two")
    set_password(path, "hanako", "three")
    lines = path.read_text().splitlines()
    assert lines[0] == "# who may relay" and lines[2] == "# end"
    assert [line.split(":")[0] for line in lines] == ["# who may relay", "taro", "# end", "hanako"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert UserFile(path).verify("taro", "two") and not UserFile(path).verify("taro", "one")
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temp file left behind


def test_set_password_creates_the_file_0600(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "users"
    set_password(path, "taro", "s3cret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert UserFile(path).verify("taro", "s3cret")


def test_set_password_refuses_bad_input_and_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    for name in ("", "ta ro", "ta:ro", "ta\tro", "ta\x7fro"):
        with pytest.raises(ValueError):
            set_password(path, name, "pw")
    for password in ("", "a\0b"):
        with pytest.raises(ValueError):
            set_password(path, "taro", password)
    assert not path.exists()
    path.write_text("broken\n")
    with pytest.raises(ConfigError):
        set_password(path, "taro", "pw")
    assert path.read_text() == "broken\n"  # left for the admin to fix


def test_remove_user(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert not remove_user(path, "taro")
    set_password(path, "taro", "a")
    set_password(path, "hanako", "b")
    before = path.stat().st_ino
    assert not remove_user(path, "jiro")
    assert path.stat().st_ino == before  # untouched
    assert remove_user(path, "taro")
    assert list_users(path) == ["hanako"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- SASL ---------------------------------------------------------------------------------------
def test_plain_decodes_user_and_password() -> None:
    assert sasl.decode_plain(b64(b"\0taro\0s3cret")) == ("taro", "s3cret")
    assert sasl.decode_plain(b64(b"taro\0taro\0s3cret") + "\r\n") == ("taro", "s3cret")
    assert sasl.decode_plain(b64("\0tarō\0pässwörd".encode())) == ("tarō", "pässwörd")


@pytest.mark.parametrize("response, reply", [
    (b64(b"admin\0taro\0s3cret"), sasl.AUTH_FAILED),  # proxy authorization
    (b64(b"taro\0s3cret"), sasl.AUTH_BAD_BASE64),  # one NUL
    (b64(b"taros3cret"), sasl.AUTH_BAD_BASE64),  # no NUL
    (b64(b"\0taro\0s3c\0ret"), sasl.AUTH_BAD_BASE64),  # three NULs
    (b64(b"\0taro\0"), sasl.AUTH_FAILED),  # empty password
    (b64(b"\0\0s3cret"), sasl.AUTH_FAILED),  # empty user
    (b64(b"\0taro\0\xffs3cret"), sasl.AUTH_BAD_BASE64),  # not UTF-8
    ("AHRhcm8AczNjcmV0!", sasl.AUTH_BAD_BASE64),  # not base64
    ("AHRhcm8AczNjcmU", sasl.AUTH_BAD_BASE64),  # padding missing
    ("AHRhcm8AczNjcmV0ä=", sasl.AUTH_BAD_BASE64),  # not even ASCII
    ("=", sasl.AUTH_BAD_BASE64),  # RFC 4954's empty response
])
def test_plain_refuses(response: str, reply: str) -> None:
    with pytest.raises(SaslError) as info:
        sasl.decode_plain(response)
    assert info.value.reply == reply
    assert isinstance(info.value, MailmoatError)
    assert "s3cret" not in str(info.value)  # the reason goes to logs


def test_login_steps_and_prompts() -> None:
    assert base64.b64decode(sasl.LOGIN_USER_PROMPT[4:]) == b"Username:"
    assert base64.b64decode(sasl.LOGIN_PASSWORD_PROMPT[4:]) == b"Password:"
    assert sasl.decode_login_step("dGFybw==") == "taro"
    assert sasl.decode_login_step(b64("pässwörd".encode()) + "\r\n") == "pässwörd"
    for bad, reply in (("dGFybw=", sasl.AUTH_BAD_BASE64), ("*", sasl.AUTH_BAD_BASE64),
                       (b64(b"\xff"), sasl.AUTH_BAD_BASE64), ("", sasl.AUTH_FAILED),
                       (b64(b"ta\0ro"), sasl.AUTH_FAILED)):
        with pytest.raises(SaslError) as info:
            sasl.decode_login_step(bad)
        assert info.value.reply == reply, bad


def test_cancel() -> None:
    assert sasl.is_cancel("*") and sasl.is_cancel("*\r\n")
    assert not sasl.is_cancel("") and not sasl.is_cancel("Kg==") and not sasl.is_cancel("**")


def test_reply_codes() -> None:
    codes = {name: getattr(sasl, name)[:9] for name in dir(sasl) if name.startswith("AUTH_")}
    assert codes == {"AUTH_OK": "235 2.7.0", "AUTH_FAILED": "535 5.7.8",
                     "AUTH_CANCELLED": "501 5.7.0", "AUTH_BAD_BASE64": "501 5.5.2",
                     "AUTH_NEEDS_TLS": "538 5.7.1", "AUTH_UNKNOWN_MECH": "504 5.5.4",
                     "AUTH_ALREADY": "503 5.5.1"}
    assert sasl.AUTH_NEEDS_TLS.startswith("538 5.7.11 ")


# -- config and command line --------------------------------------------------------------------
def test_users_file_setting_is_relative_to_the_config(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("gateway:\n  auth: {users_file: var/users}\n")
    assert load_config(config).auth_users_file == tmp_path / "var" / "users"
    config.write_text("gateway:\n  auth: {users_file: /etc/mailmoat/users}\n")
    assert load_config(config).auth_users_file == Path("/etc/mailmoat/users")
    config.write_text("gateway: {hostname: mx.example.jp}\n")
    assert load_config(config).auth_users_file is None
    assert load_config(None).auth_users_file is None
    config.write_text("gateway:\n  auth: {user_file: x}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "gateway.auth.user_file: unknown key; did you mean 'users_file'?" in str(info.value)


def mailmoat(*args: str, stdin: str = "", cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mta.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_cli_user_add_delete_list(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("gateway:\n  auth: {users_file: var/users}\n")
    users_file = tmp_path / "var" / "users"
    added = mailmoat("user", "add", "taro", "--config", str(config), stdin="s3cret pw\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout == f"user taro: password set ({users_file})\n"
    assert UserFile(users_file).verify("taro", "s3cret pw")  # only the newline is stripped
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600

    again = mailmoat("user", "add", "taro", "--config", str(config), stdin="changed\r\nextra\n")
    assert again.returncode == 0, again.stderr
    assert UserFile(users_file).verify("taro", "changed")
    assert mailmoat("user", "add", "hanako", "--config", str(config), stdin="x").returncode == 0
    listed = mailmoat("user", "list", "--config", str(config))
    assert (listed.returncode, listed.stdout) == (0, "taro\nhanako\n")

    deleted = mailmoat("user", "delete", "taro", "--config", str(config))
    assert (deleted.returncode, deleted.stdout) == (0, f"user taro: deleted ({users_file})\n")
    assert list_users(users_file) == ["hanako"]
    missing = mailmoat("user", "delete", "taro", "--config", str(config))
    assert missing.returncode == 1 and "no such user" in missing.stderr


def test_cli_user_refusals(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("gateway:\n  auth: {users_file: users}\n")
    empty = mailmoat("user", "add", "taro", "--config", str(config), stdin="\n")
    assert empty.returncode == 2 and "empty" in empty.stderr
    bad_name = mailmoat("user", "add", "ta:ro", "--config", str(config), stdin="pw\n")
    assert bad_name.returncode == 2 and "':'" in bad_name.stderr
    assert not (tmp_path / "users").exists()
    (tmp_path / "users").write_text("# users\nbroken\n")
    broken = mailmoat("user", "add", "taro", "--config", str(config), stdin="pw\n")
    assert broken.returncode == 1
    assert broken.stderr.startswith(f"{tmp_path / 'users'}:2: ")
    assert mailmoat("user", "--config", str(config)).returncode == 2

    unset = tmp_path / "plain.yaml"
    unset.write_text("gateway: {hostname: mx.example.jp}\n")
    for args in (("add", "taro", "--config", str(unset)), ("list",)):
        result = mailmoat("user", *args, stdin="pw\n")
        assert result.returncode == 1
        assert "gateway.auth.users_file" in result.stderr
