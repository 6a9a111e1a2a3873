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

_RECEIVED = re.compile(rb"\r\nreceived:", re.IGNORECASE)
# A line longer than this is passed on in parts (memory stays bounded; the line is kept).
LONG_LINE = 64 * 1024


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
        self._header_carry = b"\r\n"  # the message starts at a line start
        self.too_big = False
        self.header_too_big = False
        self.bare_line_end = False
        self.sink_error: OSError | None = None
        self._line_start = True
        self._in_header = True

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
            self._count_header(piece)
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

    def _count_header(self, piece: bytes) -> None:
        if self._line_start and piece[:2] == b"\r\n":
            self._in_header = False
            return
        end = piece.find(b"\r\n\r\n")
        header = piece[:end + 2] if end >= 0 else piece
        self.header_bytes += len(header)
        if end >= 0:
            self._in_header = False
        # A long line is passed on in parts: the end of the last part is kept so that a
        # field name cut in two is still seen (10 bytes cannot hold a whole match again).
        scan = self._header_carry + header
        self.received_headers += len(_RECEIVED.findall(scan))
        self._header_carry = b"\r\n" if header.endswith(b"\r\n") else scan[-10:]
        if self.header_bytes > self.max_header_bytes:
            self.header_too_big = True


def dot_stuffed(path: os.PathLike[str] | str, size: int | None = None,
                block: int = 64 * 1024) -> Iterator[bytes]:
    """The first `size` bytes of a file (all of it by default) as DATA text for a next hop,
    read in blocks: every line that starts with '.' gets another '.', and the text ends
    with CRLF (the caller sends '.' CRLF)."""
    carry = b""
    line_start = True
    last = b""
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
                yield _stuff(whole, line_start)
                line_start, last = True, whole[-2:]
    if carry:
        yield _stuff(carry, line_start)
        last = carry[-2:]
    if last != b"\r\n":
        yield b"\r\n"


def _stuff(text: bytes, line_start: bool) -> bytes:
    if line_start and text[:1] == b".":
        text = b"." + text
    return text.replace(b"\n.", b"\n..")
