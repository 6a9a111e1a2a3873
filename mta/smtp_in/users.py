"""The SMTP AUTH users file: one `name:$scrypt$ln=14,r=8,p=1$SALT$HASH` line per user.

Blank lines and `#` comments are allowed. `mailmoat user add` rewrites the file atomically
and a running server notices the change at the next verification (a stat per attempt),
so no restart is needed. A broken edit never takes effect: the last good users stay.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from milters.core.errors import ConfigError
from milters.core.eventlog import log_event
from milters.core.files import file_signature
from mta.credential_file import CredentialFile, check_user_name
from mta.passwords import HASH_FORMAT, PasswordHash, hash_password, parse_hash, verify_password


def _check_password(password: str) -> None:
    if not password:
        raise ValueError("the password must not be empty")
    if "\0" in password:  # SASL PLAIN could never send it
        raise ValueError("the password must not contain a NUL character")


def _parse_line(text: str) -> tuple[str, PasswordHash]:
    name, sep, hashed = text.partition(":")
    if not sep:
        raise ValueError(f"expected NAME:{HASH_FORMAT} (a line written by `mailmoat user add`)")
    try:
        check_user_name(name)
        return name, parse_hash(hashed)
    except ValueError as exc:
        raise ValueError(f"user {name!r}: {exc}") from None


USERS_FILE: CredentialFile[PasswordHash] = CredentialFile(
    "the SMTP AUTH users file", "user", _parse_line)


def list_users(path: Path) -> list[str]:
    """The user names in file order; [] when the file does not exist yet."""
    return list(USERS_FILE.load(Path(path), private=False) or {})


class UserFile:
    """The users in force; `verify` is thread-safe and picks up edits of the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature = file_signature(self.path)
        users = USERS_FILE.load(self.path)
        if users is None:  # a configured file that is missing is a mistake: refuse to start
            raise ConfigError([f"{self.path}: cannot read: no such file "
                               "(create it with `mailmoat user add NAME`)"])
        self._users = users

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
                loaded = USERS_FILE.load(self.path)
                if loaded is None:
                    raise ConfigError([f"{self.path}: cannot read: no such file"])
                users = loaded
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
def set_password(path: Path, user: str, password: str) -> None:
    """Add `user` or replace their password. ValueError for a bad name or password,
    ConfigError when the existing file is broken (it is left alone), OSError from the disk."""
    check_user_name(user)
    _check_password(password)
    USERS_FILE.put(Path(path), user, f"{user}:{hash_password(password)}")


def remove_user(path: Path, user: str) -> bool:
    """Remove `user`; False when there was no such user (the file is then untouched)."""
    return USERS_FILE.remove(Path(path), user)
