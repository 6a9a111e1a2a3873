"""The SMTP AUTH users file: one `name:$scrypt$ln=14,r=8,p=1$SALT$HASH` line per user.

Blank lines and `#` comments are allowed. `mailmoat user add` rewrites the file atomically
and a running server notices the change at the next verification (a stat per attempt),
so no restart is needed. A broken edit never takes effect: the last good users stay.
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from milters.core.errors import ConfigError
from milters.core.eventlog import log_event
from milters.core.files import file_signature
from milters.core.secrets import world_readable

# ~50 ms and 16 MiB per hash: slow enough to hurt offline guessing, fast enough per login.
LOG2_N, BLOCK_SIZE, PARALLELISM = 14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
HASH_FORMAT = "$scrypt$ln=N,r=R,p=P$SALT$HASH"
_MAX_MEMORY = 256 * 1024 * 1024  # refuse parameters that would let one login eat the RAM
_MAX_NAME = 256


@dataclass(frozen=True)
class _Hash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    key: bytes


# Unknown users are checked against this, so a miss costs as much as a wrong password.
_DUMMY = _Hash(LOG2_N, BLOCK_SIZE, PARALLELISM, secrets.token_bytes(SALT_BYTES),
               secrets.token_bytes(KEY_BYTES))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(password: str, params: _Hash) -> bytes:
    # surrogatepass: a lone surrogate still hashes (to bytes no real password encodes to).
    secret = password.encode("utf-8", "surrogatepass")
    n = 1 << params.log2_n
    return hashlib.scrypt(secret, salt=params.salt, n=n, r=params.r, p=params.p,
                          dklen=len(params.key),
                          maxmem=128 * params.r * (n + params.p + 2) + 1024 * 1024)


def hash_password(password: str) -> str:
    """A new `$scrypt$...` string for `password`, with a fresh random salt."""
    params = _Hash(LOG2_N, BLOCK_SIZE, PARALLELISM, secrets.token_bytes(SALT_BYTES),
                   b"\0" * KEY_BYTES)
    key = _derive(password, params)
    return (f"$scrypt$ln={params.log2_n},r={params.r},p={params.p}"
            f"${_b64(params.salt)}${_b64(key)}")


def _parse_hash(text: str) -> _Hash:
    """Check one `$scrypt$...` string; ValueError says what is wrong."""
    parts = text.split("$")
    if len(parts) != 5 or parts[0] != "":
        raise ValueError(f"the hash is not {HASH_FORMAT}")
    if parts[1] != "scrypt":
        raise ValueError(f"unsupported hash scheme '{parts[1]}'; expected {HASH_FORMAT}")
    try:
        params = dict(item.split("=", 1) for item in parts[2].split(","))
        log2_n, r, p = int(params.pop("ln")), int(params.pop("r")), int(params.pop("p"))
    except (ValueError, KeyError):
        raise ValueError(f"the parameters must read ln=N,r=R,p=P (got {parts[2]})") from None
    if params:
        raise ValueError(f"unknown scrypt parameter(s) {', '.join(params)}")
    if not (1 <= log2_n <= 24 and 1 <= r <= 64 and 1 <= p <= 16):
        raise ValueError("scrypt parameters out of range (ln 1-24, r 1-64, p 1-16)")
    if 128 * r * (1 << log2_n) > _MAX_MEMORY:
        raise ValueError(f"scrypt parameters need more than {_MAX_MEMORY >> 20} MiB per login")
    try:
        salt, key = _unb64(parts[3]), _unb64(parts[4])
    except (binascii.Error, ValueError):
        raise ValueError("the salt or hash is not base64") from None
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("the salt (8 bytes) or hash (16 bytes) is too short")
    return _Hash(log2_n, r, p, salt, key)


def check_user_name(name: str) -> None:
    """ValueError unless `name` can be a user: no ':', whitespace or control characters."""
    if not name:
        raise ValueError("a user name must not be empty")
    if len(name) > _MAX_NAME:
        raise ValueError(f"a user name must be at most {_MAX_NAME} characters")
    for ch in name:
        if ch == ":" or ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs"):
            raise ValueError(f"a user name must not contain ':', whitespace or control "
                             f"characters (found {ch!r})")


def _check_password(password: str) -> None:
    if not password:
        raise ValueError("the password must not be empty")
    if "\0" in password:  # SASL PLAIN could never send it
        raise ValueError("the password must not contain a NUL character")


# -- reading ----------------------------------------------------------------------------------
def _read_lines(path: Path, *, private: bool = False) -> list[str] | None:
    """The file's lines (None when it does not exist); ConfigError when unreadable, or when
    `private` (the server reading it) and every user could read it. `user add` may still
    rewrite such a file: it writes it back 0600."""
    try:
        with path.open("rb") as handle:
            # Password hashes, readable by every user, invite offline guessing: refused like
            # any secret file (core.secrets).
            problem = world_readable(os.fstat(handle.fileno()).st_mode) if private else None
            data = handle.read() if problem is None else b""
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if problem is not None:
        raise ConfigError([f"{path}: the SMTP AUTH users file {problem}; run "
                           f"'chmod o-rwx {path}'"])
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    lines, problems = [], []
    for number, raw in enumerate(raw_lines, 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(f"{path}:{number}: not UTF-8 text")
            lines.append("")
    if problems:
        raise ConfigError(problems)
    return lines


def _parse(lines: list[str], path: Path) -> dict[str, tuple[int, _Hash]]:
    """user -> (line index, hash); ConfigError listing every bad line as FILE:LINE: problem."""
    users: dict[str, tuple[int, _Hash]] = {}
    problems = []
    for index, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{index + 1}"
        name, sep, hashed = text.partition(":")
        if not sep:
            problems.append(f"{where}: expected NAME:{HASH_FORMAT} "
                            "(a line written by `mailmoat user add`)")
            continue
        try:
            check_user_name(name)
        except ValueError as exc:
            problems.append(f"{where}: user {name!r}: {exc}")
            continue
        try:
            params = _parse_hash(hashed)
        except ValueError as exc:
            problems.append(f"{where}: user {name!r}: {exc}")
            continue
        if name in users:
            problems.append(f"{where}: user {name!r} appears again "
                            f"(first on line {users[name][0] + 1})")
            continue
        users[name] = (index, params)
    if problems:
        raise ConfigError(problems)
    return users


def list_users(path: Path) -> list[str]:
    """The user names in file order; [] when the file does not exist yet."""
    lines = _read_lines(Path(path))
    return [] if lines is None else list(_parse(lines, Path(path)))


class UserFile:
    """The users in force; `verify` is thread-safe and picks up edits of the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature = file_signature(self.path)
        lines = _read_lines(self.path, private=True)
        if lines is None:  # a configured file that is missing is a mistake: refuse to start
            raise ConfigError([f"{self.path}: cannot read: no such file "
                               "(create it with `mailmoat user add NAME`)"])
        self._users = {name: params for name, (_, params) in _parse(lines, self.path).items()}

    @property
    def names(self) -> list[str]:
        return list(self._users)

    def _reload_if_changed(self) -> None:
        if file_signature(self.path) == self._signature:
            return
        with self._lock:
            signature = file_signature(self.path)
            if signature == self._signature:  # another thread got here first
                return
            # Remember the new state even if it is broken, so it is reported once, not per login.
            self._signature = signature
            try:
                lines = _read_lines(self.path, private=True)
                if lines is None:
                    raise ConfigError([f"{self.path}: cannot read: no such file"])
                users = {name: params for name, (_, params) in _parse(lines, self.path).items()}
            except ConfigError as exc:
                log_event("users_reload_failed", level=logging.ERROR, file=str(self.path),
                          problems=len(exc.problems), action="keeping the last good users")
                for problem in exc.problems:
                    log_event("users_problem", level=logging.ERROR, detail=problem)
                return
            self._users = users
        log_event("users_reloaded", file=str(self.path), users=len(users))

    def verify(self, user: str, password: str) -> bool:
        """True when `password` is `user`'s; takes about as long for an unknown user."""
        self._reload_if_changed()
        stored = self._users.get(user)
        params = stored if stored is not None else _DUMMY
        matches = hmac.compare_digest(_derive(password, params), params.key)
        return matches and stored is not None


# -- writing ----------------------------------------------------------------------------------
@contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """Serialize concurrent `user add/delete` runs (the file itself is replaced, so lock its dir)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomically(path: Path, lines: list[str]) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory: all or nothing."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        try:  # keep the owner a server running as another user relies on
            st = os.stat(path)
            os.fchown(fd, st.st_uid, st.st_gid)
        except OSError:
            pass
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def set_password(path: Path, user: str, password: str) -> None:
    """Add `user` or replace their password. ValueError for a bad name or password,
    ConfigError when the existing file is broken (it is left alone), OSError from the disk."""
    path = Path(path)
    check_user_name(user)
    _check_password(password)
    line = f"{user}:{hash_password(password)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked_dir(path.parent):
        lines = _read_lines(path) or []
        users = _parse(lines, path)
        if user in users:
            lines[users[user][0]] = line
        else:
            lines.append(line)
        _write_atomically(path, lines)


def remove_user(path: Path, user: str) -> bool:
    """Remove `user`; False when there was no such user (the file is then untouched)."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    with _locked_dir(path.parent):
        lines = _read_lines(path)
        if lines is None:
            return False
        users = _parse(lines, path)
        if user not in users:
            return False
        del lines[users[user][0]]
        _write_atomically(path, lines)
    return True
