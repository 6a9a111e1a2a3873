"""The DKIM canonical body (RFC 6376 3.4.3 simple, 3.4.4 relaxed), made chunk by chunk as
the body arrives: one streaming canonicalizer for the auth milter's body hashes (DKIM and ARC
verification) and the sign milter's (DKIM signing, ARC sealing). Memory per body does not
grow with it, however big.

The canonical body equals, byte for byte, what dkimpy makes of the whole body (the auth
milter hands dkimpy the digest instead of the body; OpenDKIM reads line ends the same way):
every LF not preceded by a CR is a line end, then simple (trailing empty lines cut to one
CRLF; CRLF for an empty body) or relaxed (whitespace runs to one space, none before a line
end, trailing empty lines cut, an empty body stays empty).

Only what a later byte can change is held back, in a few bytes of state: a trailing CR, a
trailing whitespace run (relaxed, as one space) and a count of trailing empty lines. Every
regex here is linear (no backtracking), so a hostile body cannot make hashing quadratic.
"""
from __future__ import annotations

import re
from typing import Callable

CANONS = ("relaxed", "simple")

_BARE_LF = re.compile(rb"(?<!\r)\n")
_WSP = re.compile(rb"[\t ]+")
_CRLFS_AT_ONCE = 32768  # held-back empty lines are handed out in pieces of this many


class CanonicalBody:
    """One canonicalization of a body: fed raw chunks, it hands the final canonical bytes,
    in order, to `out` (a hash's update, or several). `length` counts the bytes handed out
    (all of them once finished)."""

    def __init__(self, canon: str, out: Callable[[bytes], object]) -> None:
        if canon not in CANONS:
            raise ValueError(f"body canonicalization {canon!r}: not relaxed or simple")
        self.relaxed = canon == "relaxed"
        self.length = 0
        self._out = out
        self._carry = b""  # raw tail a later byte may change: at most b" \r"
        self._empty_lines = 0  # CRLFs held back: they vanish if nothing else follows
        self._content = False  # anything but empty lines seen (relaxed: empty body is b"")
        self._finished = False

    def feed(self, chunk: bytes) -> None:
        if self._finished:
            raise ValueError("body fed after its end")
        data = self._carry + chunk
        if b"\n" in data:
            data = _BARE_LF.sub(b"\r\n", data)  # a bare LF is a line end
        cut = data.rfind(b"\n") + 1
        lines, rest = data[:cut], data[cut:]  # whole lines; the line still open
        keep = len(rest) - 1 if rest.endswith(b"\r") else len(rest)  # CR: maybe a CRLF
        # The lines and the open line go out in one _put: measured faster than two, by
        # 10-40% with chunks of about 64 bytes, the same with big ones.
        if self.relaxed:
            keep = len(rest[:keep].rstrip(b" \t"))  # whitespace: maybe before a line end
            # A run compressed to one space, then dropped before CRLF: the same as
            # strip-then-compress, without the backtracking of a regex like rb"\s+\r\n".
            lines = _WSP.sub(b" ", lines).replace(b" \r\n", b"\r\n")
            self._carry = _WSP.sub(b" ", rest[keep:])
            self._put(lines + _WSP.sub(b" ", rest[:keep]))
        else:
            self._carry = rest[keep:]
            self._put(lines + rest[:keep])

    def finish(self) -> None:
        """The body ended: what was held back is final; one CRLF ends a simple body and a
        relaxed one with content. Once only; later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        carry, self._carry = self._carry, b""
        self._put(carry)
        if self._content or not self.relaxed:
            self._emit(b"\r\n")

    def _put(self, piece: bytes) -> None:
        """Canonical bytes whose trailing CRLFs may still be empty lines at the end."""
        if not piece:
            return
        # Every LF here follows a CR; the last "\r\r" (a bare CR) ends any CRLF run.
        tail = piece[len(piece.rstrip(b"\r\n")):]
        run = 0
        if tail.endswith(b"\r\n"):
            bare_cr = tail.rfind(b"\r\r")
            run = (len(tail) - (bare_cr + 1 if bare_cr >= 0 else 0)) // 2
        content = len(piece) - 2 * run
        if content == 0:
            self._empty_lines += run
            return
        while self._empty_lines:  # not the end after all
            count = min(self._empty_lines, _CRLFS_AT_ONCE)
            self._emit(b"\r\n" * count)
            self._empty_lines -= count
        self._emit(piece[:content])
        self._empty_lines = run
        self._content = True

    def _emit(self, data: bytes) -> None:
        self.length += len(data)
        self._out(data)
