"""Socket reads on the event loop without a fresh buffer per read.

A plain asyncio.Protocol gets each read as a new 256 KiB bytes object that is shrunk to what
arrived: glibc maps and unmaps such a block every time (mmap, mremap, munmap and page faults:
ten reads and thirty system calls per SMTP session with a milter). As a BufferedProtocol a
connection reads into one buffer per thread instead, and copies out only what arrived.
"""
from __future__ import annotations

import abc
import asyncio
import threading

READ_SIZE = 256 * 1024  # as much as asyncio reads at a time by default

_local = threading.local()


def shared_buffer() -> bytearray:
    """This thread's read buffer: fill it and copy out at once."""
    # One per thread: each read is copied out before the loop does anything else, and a
    # loop runs in one thread, so the connections of a loop never need the buffer at once.
    buffer: bytearray | None = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = bytearray(READ_SIZE)
    return buffer


class ReadIntoShared(asyncio.BufferedProtocol, abc.ABC):
    """Subclasses implement bytes_received(data), called with a view that is valid only
    during the call (copy what you keep)."""

    def get_buffer(self, sizehint: int) -> bytearray:
        return shared_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        with memoryview(shared_buffer()) as view, view[:nbytes] as data:
            self.bytes_received(data)

    @abc.abstractmethod
    def bytes_received(self, data: memoryview) -> None:
        """The bytes that arrived (a view into the shared buffer)."""
