"""The DATA phase as a stream: end-of-data detection, dot-unstuffing, and the checks that
must hold for the whole message, in blocks as they arrive and never a line at a time.

Only CRLF.CRLF ends the data (RFC 5321 4.1.1.4). Any bare LF or bare CR anywhere makes the
message refused after the terminator (SMTP smuggling, CVE-2023-51764: `\\n.\\n` and friends
must never end or split a message). The text is handed on in pieces that end at a line end,
so a terminator or a dot can never straddle two pieces.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterator

from .header_end import LONG_LINE, first_stray_line

_RECEIVED = re.compile(rb"\r\nreceived:", re.IGNORECASE)
# The Message-ID, for the audit log's `queued` record (a fold before the value allowed).
_MESSAGE_ID = re.compile(rb"\r\nmessage-id:[ \t]*(?:\r\n[ \t]+)?(<[^<>\r\n]{1,250}>)",
                         re.IGNORECASE)
# A line longer than LONG_LINE is passed on in parts (memory stays bounded; the line is
# kept); the header's lines are judged on that many bytes (mta/smtp_in/header_end.py).


class DataStream:
    """Feed it the connection's buffer; it consumes data up to and including the
    terminator and leaves whatever follows (pipelined commands) in the buffer."""

    def __init__(self, sink: Callable[[bytes], None], *, max_size: int,
                 max_header_bytes: int) -> None:
        self._sink = sink
        self.max_size = max_size
        self.max_header_bytes = max_header_bytes
        self.size = 0  # bytes of message after unstuffing (what would be stored)
        self.header_bytes = 0
        self.received_headers = 0  # Received: fields in the header (mail loops show there)
        self.message_id: str | None = None  # the first Message-ID field's value
        self._header_carry = b"\r\n"  # the message starts at a line start
        self.too_big = False
        self.header_too_big = False
        self.bare_line_end = False
        self.sink_error: OSError | None = None
        self._line_start = True
        self._in_header = True
        self._after_field = False  # a line starting with a blank continues the field above
        # The first line that ended the header early (a BOM, a fold without indentation, a
        # body without the empty line before it): an empty line was put before it.
        self.stray_header_line: bytes | None = None

    @property
    def refused(self) -> bool:
        return (self.too_big or self.header_too_big or self.bare_line_end
                or self.sink_error is not None)

    def feed(self, buf: bytearray) -> bool:
        """Consume what can be consumed; True once the terminator has been read."""
        if self._line_start and buf[:3] == b".\r\n":
            del buf[:3]
            return True
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            self._piece(bytes(buf[:end + 2]))
            del buf[:end + 5]
            return True
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            # Everything up to the last line end; the rest may be the start of a terminator.
            self._piece(bytes(buf[:cut + 2]))
            del buf[:cut + 2]
        # What is left has no line end. Not elif: a long partial line after the last CRLF
        # must go on now too, or a client whose reading is paused (a full buffer) would
        # wait for input that never comes.
        if len(buf) > LONG_LINE:
            # Keep the last byte: it may be the CR of a CRLF still on its way.
            self._piece(bytes(buf[:-1]), ends_line=False)
            del buf[:-1]
        return False

    def _piece(self, piece: bytes, ends_line: bool = True) -> None:
        if piece.count(b"\r\n") != piece.count(b"\n") or piece.count(b"\r\n") != piece.count(b"\r"):
            self.bare_line_end = True
        if self._line_start and piece[:1] == b".":
            piece = piece[1:]
        if b"\r\n." in piece:
            piece = piece.replace(b"\r\n.", b"\r\n")
        if self._in_header:
            piece = self._through_header(piece, ends_line)
        self._line_start = ends_line
        self.size += len(piece)
        if self.size > self.max_size:
            self.too_big = True
        if self.refused:
            return  # read on to the terminator, keep nothing
        try:
            self._sink(piece)
        except OSError as exc:
            self.sink_error = exc

    def _through_header(self, piece: bytes, ends_line: bool) -> bytes:
        """Count the header's bytes and Received fields, and end the header where Postfix's
        cleanup ends it (mta/smtp_in/header_end.py): the piece comes back with the empty line put
        before the first line that cannot stand in a header."""
        start = 0
        if not self._line_start:  # the rest of a long line judged when it began
            start = piece.find(b"\r\n") + 2
            if start == 1:
                start = len(piece)
        if self._line_start and piece[:2] == b"\r\n":
            header_end = 0  # the piece starts with the empty line
        else:
            blank = piece.find(b"\r\n\r\n", max(0, start - 2))
            header_end = blank + 2 if blank >= 0 else len(piece)
        stray = first_stray_line(piece[start:header_end], self._after_field, LONG_LINE,
                                 cut=not ends_line)
        if stray is not None:
            header_end = start + stray
            self.stray_header_line = piece[header_end:header_end + 60].split(b"\r\n")[0]
            piece = piece[:header_end] + b"\r\n" + piece[header_end:]
        elif header_end > start:
            self._after_field = True
        if header_end < len(piece) or stray is not None:
            self._in_header = False
        header = piece[:header_end]
        self.header_bytes += len(header)
        # A long line is passed on in parts: the end of the last part is kept so that a
        # field name cut in two is still seen (10 bytes cannot hold a whole match again).
        scan = self._header_carry + header
        self.received_headers += len(_RECEIVED.findall(scan))
        if self.message_id is None:
            found = _MESSAGE_ID.search(scan)
            if found:
                self.message_id = found.group(1).decode("utf-8", "backslashreplace")
        self._header_carry = b"\r\n" if header.endswith(b"\r\n") else scan[-10:]
        if self.header_bytes > self.max_header_bytes:
            self.header_too_big = True
        return piece


# RFC 5321 4.5.3.1.6: at most 998 octets on a line before its CRLF; a next hop may refuse
# more (aiosmtpd, Exchange do). smtpd accepts longer lines, as Postfix does, so delivery
# breaks them as Postfix's smtp client does (smtp_line_length_limit): in the header with
# CRLF and a space, a fold that keeps the field one field; in the body with CRLF.
LINE_LIMIT = 998
# Anchored at line starts (text handed here always starts at one): unanchored, the search
# would re-scan every line from each of its bytes, 7x the time on a base64 body.
_TOO_LONG = re.compile(rb"(?m)^[^\n]{%d}" % (LINE_LIMIT + 2))  # the CR before the LF counts


def _break_long_lines(text: bytes, in_header: bool) -> tuple[bytes, bool]:
    """`text` (whole lines) with no line past LINE_LIMIT, and whether the header goes on
    after it."""
    if not in_header and not _TOO_LONG.search(text):
        return text, False
    out = []
    ends_line = text.endswith(b"\n")
    for line in (text[:-1] if ends_line else text).split(b"\n"):
        content, end = (line[:-1], b"\r") if line.endswith(b"\r") else (line, b"")
        if in_header and not content:
            in_header = False  # the empty line: the body follows
        elif len(content) > LINE_LIMIT:
            # A byte short of the limit: room for the fold's space, or a stuffed dot.
            step = LINE_LIMIT - 1
            content = (b"\r\n " if in_header else b"\r\n").join(
                content[i:i + step] for i in range(0, len(content), step))
        out.append(content + end)
    return b"\n".join(out) + (b"\n" if ends_line else b""), in_header


def dot_stuffed(path: os.PathLike[str] | str, size: int | None = None,
                block: int = 64 * 1024) -> Iterator[bytes]:
    """The first `size` bytes of a file (all of it by default) as DATA text for a next hop,
    read in blocks: every line that starts with '.' gets another '.', no line is longer
    than LINE_LIMIT, and the text ends with CRLF (the caller sends '.' CRLF)."""
    carry = b""
    line_start = True
    last = b""
    in_header = True
    left = -1 if size is None else size
    with open(path, "rb") as source:
        while left != 0:
            chunk = source.read(block if left < 0 else min(block, left))
            if not chunk:
                break
            if left > 0:
                left -= len(chunk)
            text = carry + chunk
            cut = text.rfind(b"\n") + 1
            whole, carry = text[:cut], text[cut:]
            if whole:
                whole, in_header = _break_long_lines(whole, in_header)
                yield _stuff(whole, line_start)
                line_start, last = True, whole[-2:]
    if carry:
        carry, _ = _break_long_lines(carry, in_header)
        yield _stuff(carry, line_start)
        last = carry[-2:]
    if last != b"\r\n":
        yield b"\r\n"


def _stuff(text: bytes, line_start: bool) -> bytes:
    if line_start and text[:1] == b".":
        text = b"." + text
    return text.replace(b"\n.", b"\n..")
