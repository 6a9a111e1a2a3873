"""The SMTP AUTH users file: one `name:$scrypt$ln=14,r=8,p=1$SALT$HASH` line per user.

Blank lines and `#` comments are allowed. `mailmoat user add` rewrites the file atomically
and a running server notices the change at the next verification (a stat per attempt),
so no restart is needed. A broken edit never takes effect: the last good users stay.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from milters.core.errors import ConfigError
from milters.core.eventlog import log_event
from milters.core.files import file_signature
from milters.core.secrets import world_readable
from mta.passwords import HASH_FORMAT, PasswordHash, hash_password, parse_hash, verify_password

_MAX_NAME = 256


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


def _parse(lines: list[str], path: Path) -> dict[str, tuple[int, PasswordHash]]:
    """user -> (line index, hash); ConfigError listing every bad line as FILE:LINE: problem."""
    users: dict[str, tuple[int, PasswordHash]] = {}
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
            params = parse_hash(hashed)
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
        return verify_password(password, self._users.get(user))


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
