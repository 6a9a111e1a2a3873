"""Loopback port helpers shared by the integration harnesses."""
from __future__ import annotations

import socket
import sys
import time

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel picks it).

    The port is released before returning, so another process may grab it
    before the caller binds: callers that can retry on EADDRINUSE should.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 5.0) -> None:
    """Block until host:port accepts a connection; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if port_is_open(host, port, timeout=max(0.05, min(0.5, remaining))):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f}s")
        time.sleep(0.02)


def is_listening(host: str, port: int) -> bool:
    """True if a TCP socket listens on host:port (IPv4), read from /proc/net/tcp.

    Unlike a connect probe, this leaves no trace: a probe would be a real
    session for the server (and for its milters).
    """
    # The kernel prints the address as a native-endian u32 of the network-order bytes.
    wanted = f"{int.from_bytes(socket.inet_aton(host), sys.byteorder):08X}:{port:04X}"
    any_addr = f"00000000:{port:04X}"
    try:
        with open("/proc/net/tcp") as fh:
            next(fh, None)  # header
            for line in fh:
                fields = line.split()
                # fields[1] local address, fields[3] state; 0A is LISTEN.
                if len(fields) > 3 and fields[3] == "0A" and fields[1] in (wanted, any_addr):
                    return True
    except OSError:
        return port_is_open(host, port)
    return False


def wait_for_listen(host: str, port: int, timeout: float = 5.0) -> None:
    """Block until host:port is in LISTEN state, without connecting to it."""
    deadline = time.monotonic() + timeout
    while not is_listening(host, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f}s")
        time.sleep(0.02)
