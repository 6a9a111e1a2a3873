"""Line ends made CRLF before MIME is read, as Thunderbird and Gmail read them.

Mail with bare CR or bare LF line ends exists (old Mac clients, scripts, broken relays).
A MIME reader that only splits at CRLF sees such a message as one text part, and its files
leave untouched; so every milter reads the message with its line ends normalised, and the
byte ranges of scan.py refer to that normalised form (what a milter rewrites is written
from it too). A CRLF message is returned as it is, without a copy.
"""
from __future__ import annotations

import mmap
import tempfile
from typing import Union

Raw = Union[bytes, mmap.mmap]
CHUNK = 1024 * 1024
SPOOL_IN_MEMORY = 1024 * 1024


def has_bare_line_ends(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def to_crlf(data: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF as CRLF (CR LF stays one line end, not two)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def normalize_line_ends(raw: Raw) -> Raw:
    if not isinstance(raw, mmap.mmap):
        return to_crlf(raw) if has_bare_line_ends(raw) else raw
    if not _mapped_has_bare(raw):
        return raw
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    carry = b""
    for at in range(0, len(raw), CHUNK):
        piece = carry + raw[at:at + CHUNK]
        # A CR at the end of a piece may be the first half of a CRLF: decide with the next.
        carry = piece[-1:] if piece.endswith(b"\r") else b""
        out.write(to_crlf(piece[:len(piece) - len(carry)]))
    out.write(to_crlf(carry))
    out.flush()
    if not out._rolled:  # noqa: SLF001 -- only SpooledTemporaryFile knows
        out.seek(0)
        return out.read()
    mapped = mmap.mmap(out.fileno(), out.tell(), access=mmap.ACCESS_READ)
    out.close()  # the mapping keeps the (already unlinked) file's data
    return mapped


def _mapped_has_bare(raw: mmap.mmap) -> bool:
    previous = b""
    for at in range(0, len(raw), CHUNK):
        # One byte of overlap, so a CRLF split between two pieces is seen whole.
        piece = previous + raw[at:at + CHUNK]
        body = piece if not piece.endswith(b"\r") or at + CHUNK >= len(raw) else piece[:-1]
        if has_bare_line_ends(body):
            return True
        previous = piece[len(body):]
    return False
