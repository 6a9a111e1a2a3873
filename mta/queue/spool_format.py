"""The spool's format number, in the file `format` beside active/ and tmp/ (a number and a
newline), written when the spool is made.

A spool without it was written before formats were kept: format 1, the same layout, marked
when it is opened. A format above SPOOL_FORMAT was written by a newer mailmoat and is
refused: mail is never read in a layout this code does not know. The steps from one format
to the next go in SPOOL_MIGRATIONS.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

from milters.core.errors import MailmoatError

FORMAT_FILE = "format"
SPOOL_FORMAT = 1
# Steps that take a spool from format N to N + 1, by N; none yet (format 1 is the first).
SPOOL_MIGRATIONS: dict[int, Callable[[Path], None]] = {}


class SpoolFormatError(MailmoatError):
    """The spool was written in a format this mailmoat does not know: refuse to start."""


def spool_format(spool: Path) -> int | None:
    """The format a spool's `format` file names; None when it has none (before formats)."""
    try:
        text = (spool / FORMAT_FILE).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpoolFormatError(f"spool {spool}: cannot read {FORMAT_FILE}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip().isdigit():
        raise SpoolFormatError(f"spool {spool}: {FORMAT_FILE} holds {text[:40]!r}, not a "
                               "format number")
    return int(text)


def _mark(spool: Path, version: int) -> None:
    """Write `format` atomically through tmp/ (a crash leaves the old mark or the new)."""
    staged = spool / "tmp" / f"{FORMAT_FILE}.{secrets.token_hex(4)}"
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"%d\n" % version)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(staged, spool / FORMAT_FILE)
    directory = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def upgrade_spool(spool: Path) -> None:
    """Bring a spool to SPOOL_FORMAT (a new or unmarked one is marked), or refuse one that
    a newer mailmoat wrote."""
    found = spool_format(spool)
    if found is not None and found > SPOOL_FORMAT:
        raise SpoolFormatError(
            f"spool {spool}: format {found} is newer than this mailmoat knows (up to "
            f"{SPOOL_FORMAT}): it was written by a newer mailmoat; run that version to "
            "deliver what is queued, or give this one another queue.dir")
    if found == SPOOL_FORMAT:
        return
    try:
        for version in range(max(found or 1, 1), SPOOL_FORMAT):
            SPOOL_MIGRATIONS[version](spool)
        _mark(spool, SPOOL_FORMAT)
    except OSError as exc:  # a staged file left in tmp/ goes with the queue's recovery
        raise SpoolFormatError(f"spool {spool}: cannot upgrade it to format {SPOOL_FORMAT}: "
                               f"{exc.strerror or exc} (run this as the spool's owner)"
                               ) from None
