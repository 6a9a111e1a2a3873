"""Secrets (the Redis password, the Nextcloud app password, partners' ZIP passwords) come from
an environment variable or a file that the config names, never from the YAML itself.

Config files get copied, committed, pasted into tickets and shown by `policy check`; a
password in one leaks with it. A secret file must not be readable by every user of the host
(like ssh's private keys, or Postfix's sasl_passwd maps): it is refused, not read, when its
mode lets "other" read it. No function here ever puts the secret itself into a message.
"""
from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError

# Keys that, written into a config, would hold a secret's value: refused with a hint that
# names the env/file keys of the same mapping.
SECRET_WORDS = ("password", "passwd", "pass", "secret", "token", "app_password",
                "api_key", "apikey")


@dataclass(frozen=True)
class SecretSource:
    """Where one secret is: an environment variable or a file (exactly one of the two)."""

    env: str = ""
    file: str = ""

    @property
    def named(self) -> bool:
        return bool(self.env or self.file)


def read_secret(source: SecretSource, what: str, *, env_key: str = "password_env",
                file_key: str = "password_file",
                environ: Mapping[str, str] | None = None) -> str:
    """The secret's value, stripped of surrounding white space; ConfigError (naming `what`,
    the variable or the file, never the value) when it cannot be had safely."""
    env = os.environ if environ is None else environ
    if source.env and source.file:
        raise ConfigError([f"{what}: set {env_key} or {file_key}, not both"])
    if source.env:
        value = env.get(source.env, "").strip()
        if not value:
            raise ConfigError([f"{what}: environment variable {source.env} ({env_key}) "
                               "is not set or empty"])
        return value
    if source.file:
        return _read_file(Path(source.file), what, file_key)
    raise ConfigError([f"{what}: {env_key} or {file_key} is required (where the password "
                       "is)"])


def _read_file(path: Path, what: str, file_key: str) -> str:
    try:
        with path.open("rb") as handle:
            # fstat on the open file: the mode checked is the mode of what is read.
            problem = world_readable(os.fstat(handle.fileno()).st_mode)
            if problem:
                raise ConfigError([f"{what}: {file_key} {path} {problem}; run "
                                   f"'chmod o-rwx {path}' (0600 or 0640 with the "
                                   "gateway's group)"])
            raw = handle.read()
    except OSError as exc:
        raise ConfigError([f"{what}: cannot read {file_key} {path}: "
                           f"{exc.strerror or exc}"]) from None
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        value = None
    if value is None:  # raised outside the except: no chained exception with the bytes
        raise ConfigError([f"{what}: {file_key} {path} is not UTF-8 text"])
    value = value.strip()
    if not value:
        raise ConfigError([f"{what}: {file_key} {path} is empty"])
    return value


def world_readable(mode: int) -> str | None:
    """Why a secret file with this mode must not be used, or None."""
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if mode & stat.S_IROTH:
        return f"is readable by every user (mode {stat.S_IMODE(mode):04o})"
    return None


def secret_key_hint(key: str, allowed: list[str]) -> str | None:
    """The error for a key that would hold a secret inline, naming this mapping's own
    env/file keys; None when `key` does not look like one."""
    if key.lower() not in SECRET_WORDS:
        return None
    sources = [name for name in allowed if name.endswith(("_env", "_file"))]
    where = (" or ".join(sources) if sources
             else "an environment variable or a file named in the config")
    return (f"never write a secret into the config: name where it is instead, with {where} "
            "(a file must not be readable by every user)")


def redis_url_secret(url: str) -> str | None:
    """Why a redis:// or rediss:// URL holds a secret (a password in its user part or its
    query), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return None
    if parts.password is not None:
        return "the Redis URL holds a password"
    if any(name.lower() in SECRET_WORDS for name, _ in parse_qsl(parts.query)):
        return "the Redis URL holds a password in its query"
    return None


def mask_url(url: str) -> str:
    """The URL with its password and query values replaced by ***, fit for errors and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{parts.username or ''}:***@{host}"
    query = "&".join(f"{name}=***" for name, _ in parse_qsl(parts.query, keep_blank_values=True))
    return parts._replace(netloc=netloc, query=query).geturl()


def signing_key(path: Path, setting: str, size: int = 32) -> bytes:
    """A signing key kept in a file (sessions, review links): read, or made with `size`
    random bytes (hex, mode 0600 whatever the umask) when missing; refused when group or
    others may read or write it, when it is no regular file, or when it is too short.
    `setting` names the config key in every error."""
    what = f"{setting} {path}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError([f"{what}: cannot create it: {exc.strerror or exc}"]) from None
    else:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secrets.token_hex(size).encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode  # of what is read, not of a path
            if not stat.S_ISREG(mode):
                raise ConfigError([f"{what} is not a regular file"])
            if mode & 0o066:
                raise ConfigError([f"{what} may be read or written by group or others "
                                   f"(mode {stat.S_IMODE(mode):04o}); run 'chmod 600 {path}'"])
            key = handle.read().strip()
    except OSError as exc:
        raise ConfigError([f"{what}: cannot read it: {exc.strerror or exc}"]) from None
    if len(key) < size:
        raise ConfigError([f"{what} holds fewer than {size} bytes; delete it and a new key "
                           "is made"])
    return key
