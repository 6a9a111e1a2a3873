"""`scan --reinjected-dir DIR`: what the milters handed back (copies for some recipients,
password notices), written out as .eml files, so that a user can open a ZIP with the
password from its notice without a running gateway."""
from __future__ import annotations

import os
import re
from pathlib import Path

from milters.core.errors import OutputFileError

_UNSAFE = re.compile(r"[^A-Za-z0-9@._+-]+")
_MAX_PART = 80  # characters of an address kept in a file name


def safe_part(text: str) -> str:
    """An address as a file name part: no path separators, no leading dot, bounded."""
    part = _UNSAFE.sub("_", text).strip("._") or "unknown"
    return part[:_MAX_PART]


def copy_name(index: int, recipients: list[str]) -> str:
    """NN-for-RECIPIENT.eml (the first recipient; how many more, if any)."""
    who = safe_part(recipients[0]) if recipients else "nobody"
    more = f"-and-{len(recipients) - 1}-more" if len(recipients) > 1 else ""
    return f"{index:02d}-for-{who}{more}.eml"


def write_copy(directory: Path, name: str, raw: bytes) -> Path:
    """Write one message, readable by its owner only (a notice holds a password); an
    existing file of that name is replaced, a symlink in its place is refused."""
    path = directory / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
    except OSError as exc:
        raise OutputFileError(f"{path}: {exc.strerror or exc}") from None
    return path
