"""A message's text on its way through the milter chain, held so that serve's memory is
bounded by a chunk, not by the message.

A small message stays the bytes smtpd kept while receiving it (no file opened per milter);
any other is the first `size` bytes of a file in the spool's tmp/: the spool file itself,
or a new file the chain wrote after a milter's edits. Headers are read from the file's
head (bounded by gateway.max_header_bytes, which smtpd enforces on the way in), the body is
read in BODY_CHUNK pieces as it goes to a milter, and an edited message is written to a
new file, its unchanged body copied file to file in the kernel (copy_file_range), as
Postfix's cleanup writes a new queue file rather than building the message in memory.
"""
from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from milters.core.milter_protocol import BODY_CHUNK

IN_MEMORY = 64 * 1024  # bytes: a text (or a milter's new body) up to this stays in memory
_HEAD_BLOCK = 64 * 1024  # bytes read at a time while looking for the end of the header


def parse_fields(head: bytes) -> list[bytes]:
    """Header fields, each with its continuation lines and CRLF."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line  # a continuation line belongs to the field above
        elif line.strip():
            fields.append(line)
    return fields


@dataclass(frozen=True)
class MessageText:
    """A message with CRLF line ends: `data` when small, else the first `size` bytes of
    the file at `path`."""

    data: bytes | None = None
    path: str | None = None
    size: int = 0

    @classmethod
    def of(cls, data: bytes) -> "MessageText":
        return cls(data=data, size=len(data))

    def read(self) -> bytes:
        """The whole text (scan and tests; never on serve's path for a large message)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as source:
            return source.read(self.size)

    def head(self) -> tuple[list[bytes], int]:
        """The header fields and where the body starts (after the first empty line; at the
        end when there is none, as if the body were empty)."""
        if self.data is not None:
            if self.data.startswith(b"\r\n"):
                return [], 2  # no header at all (smtpd ended it before a stray first line)
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                return parse_fields(self.data), self.size
            return parse_fields(self.data[:end + 2]), end + 4
        assert self.path is not None
        head = bytearray()
        with open(self.path, "rb") as source:
            while len(head) < self.size:
                block = source.read(min(_HEAD_BLOCK, self.size - len(head)))
                if not block:
                    break
                search_from = max(0, len(head) - 3)  # the empty line may straddle two blocks
                head += block
                if head.startswith(b"\r\n"):
                    return [], 2
                end = head.find(b"\r\n\r\n", search_from)
                if end >= 0:
                    return parse_fields(bytes(head[:end + 2])), end + 4
        return parse_fields(bytes(head)), len(head)

    def body(self, start: int) -> memoryview | Iterator[bytes]:
        """The body from `start`: a view of the bytes, or the file's pieces of BODY_CHUNK
        bytes read one at a time (close the iterator to close the file early)."""
        if self.data is not None:
            return memoryview(self.data)[start:]
        return self._pieces(start)

    def _pieces(self, start: int) -> Iterator[bytes]:
        assert self.path is not None
        left = self.size - start
        with open(self.path, "rb") as source:
            source.seek(start)
            while left > 0:
                piece = source.read(min(BODY_CHUNK, left))
                if not piece:
                    raise OSError(errno.EIO, f"{self.path}: shorter than the message")
                left -= len(piece)
                yield piece


class TextWriter:
    """A new text, built in memory while small and else in a new file in `directory`
    (recorded in `scratch`, so the caller can remove what it no longer needs)."""

    def __init__(self, directory: str | None, scratch: list[str]) -> None:
        self.directory, self.scratch = directory, scratch
        self._memory = bytearray()
        self._fd: int | None = None
        self._path: str | None = None
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        if self._fd is None and self.size + len(data) <= IN_MEMORY:
            self._memory += data
        else:
            self._write_out(data)
        self.size += len(data)

    def copy_text(self, text: MessageText, start: int) -> None:
        """Append `text` from `start` on: a file is copied by the kernel, never through
        our memory."""
        if text.data is not None:
            self.write(memoryview(text.data)[start:])
            return
        assert text.path is not None
        count = text.size - start
        if self._fd is None and self.size + count <= IN_MEMORY:
            self.write(b"".join(text.body(start)))
            return
        self._spill()
        assert self._fd is not None
        with open(text.path, "rb") as source:
            _copy_fd(source.fileno(), start, self._fd, count)
        self.size += count

    def copy_stream(self, source: BinaryIO) -> None:
        """Append what `source` has from its position on, a piece at a time."""
        while piece := source.read(BODY_CHUNK):
            self.write(piece)

    def finish(self) -> MessageText:
        if self._fd is None:
            return MessageText.of(bytes(self._memory))
        os.close(self._fd)
        self._fd = None
        return MessageText(path=self._path, size=self.size)

    def abandon(self) -> None:
        """After a failure: close and remove the file, if one was made."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._path is not None:
            _unlink_quietly(self._path)

    def _spill(self) -> None:
        if self._fd is not None:
            return
        self._fd, self._path = tempfile.mkstemp(prefix="chain-", suffix=".msg",
                                                dir=self.directory)
        self.scratch.append(self._path)
        memory, self._memory = self._memory, bytearray()
        self._write_out(memory)

    def _write_out(self, data: bytes | memoryview) -> None:
        self._spill()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]


class NewBody:
    """A replacement body as a milter sends it (SMFIR_REPLBODY, in pieces): in memory
    while small, then in an unnamed file in `directory`, so a large one is never whole in
    memory. `result()` is bytes or the file, positioned at its start."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.received = False  # an empty replacement is still a replacement
        self._memory = bytearray()
        self._file: BinaryIO | None = None

    def append(self, piece: bytes) -> None:
        self.received = True
        if self._file is None and len(self._memory) + len(piece) <= IN_MEMORY:
            self._memory += piece
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.directory)  # type: ignore[assignment]
            assert self._file is not None
            self._file.write(self._memory)
            self._memory = bytearray()
        self._file.write(piece)

    def result(self) -> bytes | BinaryIO:
        if self._file is None:
            return bytes(self._memory)
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _copy_fd(source: int, offset: int, target: int, count: int) -> None:
    """`count` bytes of `source` from `offset` to the end of `target`, in the kernel where
    it can (copy_file_range), else through a buffer of one chunk."""
    kernel = True
    while count > 0:
        if kernel:
            try:
                done = os.copy_file_range(source, target, count, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                kernel = False
                continue
        else:
            piece = os.pread(source, min(BODY_CHUNK, count), offset)
            view = memoryview(piece)
            while view:
                view = view[os.write(target, view):]
            done = len(piece)
        if done == 0:
            raise OSError(errno.EIO, "message file shorter than expected")
        offset += done
        count -= done


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
