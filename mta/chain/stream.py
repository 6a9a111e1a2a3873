"""The milter socket as both protocol drivers see it: where a milter listens, a socket to
it, and what the client asks of a connection driven on the event loop.

It sits below client.py (the protocol) and async_driver.py (the event-loop driver), so the
client names the event-loop connection by what it offers (MilterStream) and never imports
its driver.
"""
from __future__ import annotations

import socket
from typing import Any, Protocol

from milters.core.errors import MilterProtocolError


class MilterStream(Protocol):
    """A milter connection on the event loop (async_driver.MilterSocket), as the client
    uses it: to close it and to see whether it is idle enough to keep for the next session."""

    closed: bool
    connected: bool
    backlog: bytearray  # written, not yet taken by the socket
    waiter: Any  # the run waiting on this connection, or None

    def close(self, unsent: bytes = b"") -> None: ...


def socket_address(spec: str) -> tuple[int, Any]:
    """(address family, address) of a milter socket written as Postfix writes it."""
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local"):
        return socket.AF_UNIX, rest
    if kind not in ("inet", "inet6"):
        raise MilterProtocolError(f"milter socket '{spec}': use inet:, inet6: or unix:")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def new_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family != socket.AF_UNIX:
        # Small request/reply packets: without this, Nagle against delayed ACKs stalls ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_socket(spec: str, timeout: float) -> socket.socket:
    family, address = socket_address(spec)
    sock = new_socket(family)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock
