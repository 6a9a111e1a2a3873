"""A pymilter milter that reads every body byte, for testing how big messages go through.

    python -m tests.harness.body_milter inet:PORT@127.0.0.1 REPORT_FILE

For each message it appends one line to REPORT_FILE: `QUEUE_ID SHA256 BYTES LARGEST_CHUNK`
(the body as it received it). Its memory stays small: the body is hashed as it comes.
A message with `X-Edit: yes` is edited at end of message: `X-Body-SHA256: <hex>` added, and
with `X-Replace-Body: N` its body replaced by N bytes of numbered lines (replacement_body),
sent in pieces of 64 KiB as libmilter takes them.
"""
from __future__ import annotations

import hashlib
import sys
from typing import Iterator

import Milter

PIECE = 64 * 1024


def replacement_body(size: int) -> Iterator[bytes]:
    """`size` bytes of CRLF lines `replaced line NNNNNNNN`, in pieces of about PIECE."""
    line_len = len(b"replaced line 00000000\r\n")
    lines, rest = divmod(size, line_len)
    per_piece = PIECE // line_len
    for first in range(0, lines, per_piece):
        yield b"".join(b"replaced line %08d\r\n" % n
                       for n in range(first, min(first + per_piece, lines)))
    if rest:
        yield b"x" * (rest - 2) + b"\r\n" if rest >= 2 else b"x" * rest


class BodyMilter(Milter.Base):
    report = ""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.digest = hashlib.sha256()
        self.size = self.largest = 0
        self.edit = False
        self.replace_with: int | None = None

    def envfrom(self, mail_from: str, *params: str) -> int:
        self._reset()
        return Milter.CONTINUE

    def header(self, name: str, value: str) -> int:
        if name.lower() == "x-edit" and value.strip() == "yes":
            self.edit = True
        elif name.lower() == "x-replace-body":
            self.replace_with = int(value.strip())
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        self.digest.update(chunk)
        self.size += len(chunk)
        self.largest = max(self.largest, len(chunk))
        return Milter.CONTINUE

    def eom(self) -> int:
        with open(self.report, "a") as out:
            out.write(f"{self.getsymval('i')} {self.digest.hexdigest()} {self.size} "
                      f"{self.largest}\n")
        if self.edit:
            self.addheader("X-Body-SHA256", self.digest.hexdigest())
            if self.replace_with is not None:
                for piece in replacement_body(self.replace_with):
                    self.replacebody(piece)
        return Milter.CONTINUE


if __name__ == "__main__":
    BodyMilter.report = sys.argv[2]
    Milter.factory = BodyMilter
    Milter.runmilter("body-milter", sys.argv[1], 120)
