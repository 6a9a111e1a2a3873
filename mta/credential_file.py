"""A file of password hashes, one entry a line, `NAME:...`: reading it (refused when every
user may read it), parsing it with every bad line reported as FILE:LINE, and changing one
entry atomically under a lock. Shared by the SMTP AUTH users file (mta/smtp_in/users.py)
and the console's accounts (mta/console/accounts.py), which differ only in what follows
the name."""
from __future__ import annotations

import fcntl
import os
import tempfile
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from milters.core.errors import ConfigError
from milters.core.secrets import world_readable

T = TypeVar("T")
MAX_NAME = 256


def check_user_name(name: str) -> None:
    """ValueError unless `name` can be a user: no ':', whitespace or control characters."""
    if not name:
        raise ValueError("a user name must not be empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"a user name must be at most {MAX_NAME} characters")
    for ch in name:
        if ch == ":" or ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs"):
            raise ValueError(f"a user name must not contain ':', whitespace or control "
                             f"characters (found {ch!r})")


@dataclass(frozen=True)
class CredentialFile(Generic[T]):
    """What one kind of file is called (for its errors) and how an entry's line reads:
    `parse_entry(line)` returns (name, entry) or raises ValueError saying what is wrong."""

    what: str  # "the SMTP AUTH users file"
    noun: str  # "user": what one entry is, in errors
    parse_entry: Callable[[str], tuple[str, T]]
    chmod_hint: str = "o-rwx"

    def read_lines(self, path: Path, *, private: bool = True) -> list[str] | None:
        """The file's lines (None when it does not exist); ConfigError when unreadable, not
        UTF-8, or, when `private`, readable by every user: password hashes invite offline
        guessing, so they are refused like any secret file (core.secrets)."""
        try:
            with path.open("rb") as handle:
                problem = world_readable(os.fstat(handle.fileno()).st_mode) if private else None
                data = handle.read() if problem is None else b""
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
        if problem is not None:
            raise ConfigError([f"{path}: {self.what} {problem}; run "
                               f"'chmod {self.chmod_hint} {path}'"])
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

    def parse(self, lines: list[str], path: Path) -> dict[str, tuple[int, T]]:
        """name -> (line index, entry); ConfigError listing every bad line as FILE:LINE."""
        entries: dict[str, tuple[int, T]] = {}
        problems = []
        for index, line in enumerate(lines):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}:{index + 1}"
            try:
                name, entry = self.parse_entry(text)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                continue
            if name in entries:
                problems.append(f"{where}: {self.noun} {name!r} appears again "
                                f"(first on line {entries[name][0] + 1})")
                continue
            entries[name] = (index, entry)
        if problems:
            raise ConfigError(problems)
        return entries

    def load(self, path: Path, *, private: bool = True) -> dict[str, T] | None:
        """name -> entry; None when the file does not exist."""
        lines = self.read_lines(Path(path), private=private)
        if lines is None:
            return None
        return {name: entry for name, (_, entry) in self.parse(lines, Path(path)).items()}

    def put(self, path: Path, name: str, line: str) -> None:
        """Add the entry `name` as `line`, or replace its line. A broken file is left alone
        (ConfigError); a file every user could read is written back 0600."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked_dir(path.parent):
            lines = self.read_lines(path, private=False) or []
            entries = self.parse(lines, path)
            if name in entries:
                lines[entries[name][0]] = line
            else:
                lines.append(line)
            _write_atomically(path, lines)

    def remove(self, path: Path, name: str) -> bool:
        """Remove the entry; False when there is none (the file is then untouched)."""
        path = Path(path)
        if not path.parent.is_dir():
            return False
        with _locked_dir(path.parent):
            lines = self.read_lines(path, private=False)
            if lines is None or name not in (entries := self.parse(lines, path)):
                return False
            del lines[entries[name][0]]
            _write_atomically(path, lines)
        return True


@contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """Serialize concurrent writers (the file itself is replaced, so lock its directory)."""
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
