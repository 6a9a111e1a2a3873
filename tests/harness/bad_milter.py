"""A milter that misbehaves on cue, for tests of what the MTA does when a milter fails.

It speaks just enough of the milter protocol (version 6) to be a milter: it negotiates,
takes connect and HELO without replying, and answers `continue` to everything else, except
the one command it was told to break at, where it answers garbage, stays silent or hangs
up. Every connection is served in a thread of its own; `connections` counts them.
"""
from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path
from types import TracebackType

from milters.core.milter_protocol import ALL_ACTIONS, OptNeg, ProtocolFlag, encode_packet

# What a broken milter may answer instead of a reply.
GARBAGE = {
    "unknown-reply": encode_packet(b"Z", b"what?"),
    "bad-length": struct.pack("!I", 0xFFFFFFF0) + b"c",
    "reply-code-250": encode_packet(b"y", b"250 2.0.0 fine by me\0"),
}
_NEEDS_REPLY = frozenset(b"MRTLNBE")  # with connect and HELO negotiated as no-reply


def read_packet(conn: socket.socket) -> tuple[bytes, bytes]:
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = conn.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data
    (length,) = struct.unpack("!I", exactly(4))
    packet = exactly(length)
    return packet[:1], packet[1:]


class BadMilter:
    """Listens on a unix socket; at command `at` (b"M" for MAIL, b"E" for end of message
    ...) does `how`: one of GARBAGE's keys, "stall" (never answers) or "hang-up"."""

    def __init__(self, path: Path, at: bytes, how: str) -> None:
        assert how in GARBAGE or how in ("stall", "stop-reading", "hang-up"), how
        self.path, self.at, self.how = path, at, how
        self.connections = 0
        self.broke = threading.Event()  # set the first time it misbehaved
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._threads: list[threading.Thread] = []

    @property
    def spec(self) -> str:
        return f"unix:{self.path}"

    def __enter__(self) -> "BadMilter":
        self._listener.bind(str(self.path))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    command, _ = read_packet(conn)
                except socket.timeout:
                    continue  # (a partial packet is not expected from our client)
                if command == self.at:
                    self.broke.set()
                    if self.how == "hang-up":
                        return
                    if self.how == "stop-reading":
                        self._stop.wait()
                        return
                    if self.how != "stall":
                        conn.sendall(GARBAGE[self.how])
                elif command == b"O":
                    no_reply = ProtocolFlag.NR_CONN | ProtocolFlag.NR_HELO
                    if self.how == "stop-reading":  # the MTA streams the body unanswered
                        no_reply |= ProtocolFlag.NR_BODY
                    conn.sendall(encode_packet(b"O", OptNeg(6, ALL_ACTIONS, no_reply).encode()))
                elif command in (b"Q", b"K"):
                    return
                elif command[0] in _NEEDS_REPLY and not (
                        command == b"B" and self.how == "stop-reading"):
                    conn.sendall(encode_packet(b"c"))
        except (EOFError, OSError):
            pass  # the MTA closed the connection
        finally:
            conn.close()
