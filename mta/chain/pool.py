"""Milter connections kept open from one SMTP session to the next (protocol version 6).

At the end of an SMTP session Postfix sends QUIT and closes the milter connection; the next
session opens a new one and negotiates options again. The protocol also has QUIT_NC ("K":
quit, a new connection follows): the milter ends its session (libmilter calls its close
callback and forgets the macros) and waits for the next CONNECT on the same socket. Reusing
connections that way saves a socket, an option negotiation and, in a libmilter milter, a
thread per SMTP session: measured on the ratelimit milter, about a third of its CPU per
session and a fifth of serve's milter overhead (bench/mta.py).

libmilter takes QUIT_NC only right after an end of message it answered with continue: in
any other state it ignores QUIT_NC and then the next CONNECT too, so the milter would go on
with the previous client's connection data. The chain therefore offers a connection back
only in that state (ChainSession.close), and only one that ended cleanly: nothing unsent,
nothing unread, no step waiting for a reply. A session that ended otherwise (a refusal, an
XCLIENT or STARTTLS reset, a client that left early) closes its connections with QUIT, as
Postfix always does. An idle connection stays registered with the event loop, so a milter
that closes it (restart, its own timeout) is noticed and it is dropped, not handed out.
"""
from __future__ import annotations

import socket
import time
from collections import deque

from milters.core.milter_protocol import encode_packet

from .client import MilterClient, MilterEndpoint

MAX_IDLE = 16  # connections kept per milter: more than this are closed (QUIT)
IDLE_LIMIT = 60.0  # seconds: an older idle connection is closed rather than reused
_QUIT_NEW_CONNECTION = encode_packet(b"K")


class MilterPool:
    """Idle, negotiated milter connections by endpoint; lives on serve's event loop."""

    def __init__(self, max_idle: int = MAX_IDLE, idle_limit: float = IDLE_LIMIT) -> None:
        self.max_idle, self.idle_limit = max_idle, idle_limit
        self._idle: dict[MilterEndpoint, deque[tuple[MilterClient, float]]] = {}

    def take(self, endpoint: MilterEndpoint) -> MilterClient | None:
        """A live connection to `endpoint`, ready for CONNECT; None if there is none."""
        idle = self._idle.get(endpoint)
        now = time.monotonic()
        while idle:
            client, since = idle.pop()  # the most recent: the others may age out
            if now - since <= self.idle_limit and client.reusable() and _still_open(client):
                return client
            client.close()
        return None

    def give_back(self, client: MilterClient) -> bool:
        """Keep `client` (its milter at end of message) for the next session: QUIT_NC now.
        False when it cannot be kept and the caller should close it."""
        idle = self._idle.setdefault(client.endpoint, deque())
        if len(idle) >= self.max_idle or not client.reusable():
            return False
        stream = client.stream
        assert stream is not None  # reusable() says so
        try:
            sent = stream.send(client.take_unsent() + _QUIT_NEW_CONNECTION)
        except OSError:
            return False
        if not sent or stream.backlog:  # not taken at once: not a connection to keep
            return False
        client.next_session()
        idle.append((client, time.monotonic()))
        return True

    def idle_count(self, endpoint: MilterEndpoint) -> int:
        return len(self._idle.get(endpoint, ()))

    def close_all(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop()[0].close()


def _still_open(client: MilterClient) -> bool:
    """No end of file waiting to be read: the event loop may not have seen it yet when a
    milter closed its end just now (restart). One peek, no wait."""
    assert client.stream is not None
    try:
        client.stream.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return False  # end of file, or bytes nobody asked for: not a connection to reuse
    except (BlockingIOError, InterruptedError):
        return True  # nothing to read: open, and quiet as it should be
    except OSError:
        return False
