"""A real redis-server on 127.0.0.1 for tests, on a free port, in a temp dir.

    with RedisServer() as server:
        store = open_store(server.url)

No persistence (`--save '' --appendonly no`), so stopping it loses
everything, as a test wants. `kill()` simulates a crash.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType

REDIS_SERVER = "/usr/bin/redis-server"
HOST = "127.0.0.1"


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def answers_ping(port: int, timeout: float = 0.5) -> bool:
    """True if a Redis on `port` answers PING (raw RESP, no client library).

    A server with a password answers -NOAUTH: it is up all the same.
    """
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """Start with `start()` or `with`; `stop()` terminates and waits."""

    def __init__(
        self,
        executable: str | None = None,
        start_timeout: float = 10.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.executable = executable or shutil.which("redis-server") or REDIS_SERVER
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)  # e.g. ("--requirepass", "secret")
        self.host = HOST
        self.port = 0
        self.dir: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        if not os.access(self.executable, os.X_OK):
            raise RuntimeError(f"redis-server not found at {self.executable}")
        self.dir = tempfile.mkdtemp(prefix="mailmoat-redis-")
        # The port may be taken between free_port() and bind: try a few.
        for _ in range(5):
            self.port = free_port()
            if self._launch():
                return self
        log = self._log_tail()
        self.stop()
        raise RuntimeError(f"redis-server did not start; log:\n{log}")

    def _launch(self) -> bool:
        assert self.dir is not None
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        with log:
            self.proc = subprocess.Popen(
                [
                    self.executable,
                    "--port", str(self.port),
                    "--bind", HOST,
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", self.dir,
                    "--daemonize", "no",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # exited: most likely the port was taken
            if answers_ping(self.port) and self.proc.poll() is None:
                return True
            time.sleep(0.02)
        self._end(kill=True)
        return False

    def kill(self) -> None:
        """SIGKILL, as a crash would; the temp dir stays until stop()."""
        self._end(kill=True)

    def stop(self) -> None:
        self._end(kill=False)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _end(self, *, kill: bool) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _log_tail(self) -> str:
        if self.dir is None:
            return ""
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
