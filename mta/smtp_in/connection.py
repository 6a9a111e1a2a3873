"""One SMTP client's connection: the transport, its buffers, flow control, command lines
and the deadlines a client must keep. What the commands mean is mta/smtp_in/commands.py's and envelope_commands.py's job.

- Flow control both ways. Input: reading stops while a megabyte waits unprocessed. Output:
  when the client does not read our replies (the transport's write buffer passes its
  high-water mark, asyncio calls pause_writing) we stop reading AND stop running the
  commands already buffered, until the buffer drains. A client that streams pipelined
  commands without reading the replies can hold a few hundred KiB of ours, never more.
- Command lines: only CRLF ends one; a line longer than its limit (512 octets with the CRLF,
  RFC 5321 4.5.3.1.4, raised only where an extension says so) is dropped up to its CRLF, so
  its tail is never taken for a command, and answered 500 as an error.
- Deadlines, like Postfix's smtpd_timeout with smtpd_per_request_deadline on: a whole
  command line must arrive within the timeout of our starting to wait for it, and DATA
  within the timeout plus one second per `min_data_rate` bytes received (Postfix's
  smtpd_min_data_rate), besides the idle limit between reads. A client that trickles one
  byte at a time is cut at the deadline, whatever it keeps sending. Under connection
  pressure the timeout shrinks for every connection at once (Postfix's stress-adaptive
  smtpd_timeout: 300s, 10s under stress; see mta/smtp_in/gateway_handler.py GatewayHandler.under_stress).
"""
from __future__ import annotations

import abc
import asyncio
from typing import Any, Callable, Coroutine

from milters.core.eventlog import log_event

from mta.aio.reads import ReadIntoShared
from mta.aio.session_runner import INPUT, SessionRunner

COMMAND_LINE = 512  # octets with the CRLF (RFC 5321 4.5.3.1.4)
MAX_BUFFERED = 1 << 20  # stop reading from a client that sends this much ahead of us
# Replies are handed to the transport once this much is pending, not only when the input
# runs dry: a megabyte of pipelined NOOPs must not become 170,000 reply objects first.
REPLY_BATCH = 16 * 1024
WRITE_HIGH_WATER = 64 * 1024  # then pause_writing: we stop taking commands
WRITE_LOW_WATER = 16 * 1024
LINE_TOO_LONG = "500 5.5.2 Error: line too long"
BARE_LF = "521 5.5.2 Error: bare <LF> received; use CRLF line ends"
MAX_ERRORS = 20  # then 421, as Postfix's smtpd_hard_error_limit


class ClientConnection(ReadIntoShared, abc.ABC):
    """The byte side of an SMTP session. Subclasses say who may connect (admit), what the
    session does (session) and how long a client may take (timeout_now)."""

    hostname = "localhost"  # for the 421 replies; subclasses set it

    def __init__(self, min_data_rate: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.min_data_rate = min_data_rate
        self.buf = bytearray()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._closed = False
        self._reading_paused = False
        self._writing_paused = False
        self._discarding = False  # dropping an over-long line up to its CRLF
        self._discard_last = b""  # the last byte dropped (a CR before the LF or not)
        self._dropped: bool | None = None  # a dropped line ended (with CRLF?), not yet answered
        self._session: SessionRunner | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_input = self.loop.time()
        # What we wait for from the client: "command", "data" or None (our own work).
        self._waiting: str | None = None
        self._wait_started = 0.0
        self._data_bytes = 0
        self.peer_ip = ""
        self.peer_port = 0
        self.client_ip = ""
        self.errors = 0
        self._admitted = False  # counted by admit(): released() is owed once

    # -- what subclasses provide -------------------------------------------------------------
    @abc.abstractmethod
    def admit(self) -> str | None:
        """None to go on with this connection, or the 421 line that refuses it."""

    @abc.abstractmethod
    def greeting(self) -> str:
        """The 220 line."""

    @abc.abstractmethod
    def session(self) -> Coroutine[Any, Any, None]:
        """The session's coroutine: reads commands with read_line until the client is gone."""

    @abc.abstractmethod
    def released(self) -> None:
        """The connection is gone (called once, only for admitted connections)."""

    @abc.abstractmethod
    def timeout_now(self) -> tuple[float, bool]:
        """(the timeout that applies now, whether that is the stress value)."""

    @abc.abstractmethod
    def recheck_interval(self) -> float:
        """How often a wait is checked again, so that pressure that starts during a long
        wait shortens it too (the stress timeout)."""

    # -- asyncio.BufferedProtocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer_ip, self.peer_port = str(peer[0]), int(peer[1])
        self.client_ip = self.peer_ip
        refusal = self.admit()
        if refusal is not None:
            self.transport.write(refusal.encode() + b"\r\n")
            self.transport.close()
            self._closed = True
            return
        self._admitted = True
        self.set_write_limits()
        self.transport.write(self.greeting().encode() + b"\r\n")
        self._arm(min(self.timeout_now()[0], self.recheck_interval()))
        self._session = SessionRunner(self.loop, self.session())
        self._session.start()

    def set_write_limits(self) -> None:
        """On every transport we write through (STARTTLS brings a new one)."""
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def bytes_received(self, data: memoryview) -> None:
        self._last_input = self.loop.time()
        if self._discarding:
            self._drop(data)
        else:
            self.buf += data
        if self._waiting == "data":
            self._data_bytes += len(data)
        self._update_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._admitted:
            self._admitted = False
            self.released()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()
        self._wake()

    # -- flow control ------------------------------------------------------------------------
    def _update_reading(self) -> None:
        if self._closed:
            return
        if self._writing_paused or len(self.buf) > MAX_BUFFERED:
            pause = True
        elif self._reading_paused:
            pause = len(self.buf) >= MAX_BUFFERED // 4  # some room first, not a byte
        else:
            pause = False
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _wake(self) -> None:
        if self._session is not None:
            self._session.input_changed()

    async def more(self) -> bool:
        """Wait for input; False when the client is gone. Pending replies go out first."""
        if self._closed:
            return False
        self.flush()
        self._update_reading()
        await INPUT  # the session runner goes on when input_changed() says so
        return not self._closed or bool(self.buf)

    # -- deadlines ---------------------------------------------------------------------------
    def expect(self, what: str | None) -> None:
        """Start ("command", "data") or stop (None) the clock on the client."""
        if what is not None and self._waiting != what:
            self._wait_started = self.loop.time()
            self._data_bytes = 0
        self._waiting = what

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.call_later(max(delay, 0.05), self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._closed:
            return
        timeout, stressed = self.timeout_now()
        if self._waiting is None:  # our own work (milters, the disk): not the client's time
            self._arm(self.recheck_interval())
            return
        now = self.loop.time()
        ends = self.wait_ends(self._waiting, self._wait_started, self._last_input,
                              self._data_bytes)
        if now < ends:
            self._arm(min(ends - now, self.recheck_interval()))
            return
        log_event("timeout", ip=self.client_ip, stage=self._waiting,
                  waited=round(now - self._wait_started, 1), limit=timeout, stress=stressed)
        self.reply(f"421 4.4.2 {self.hostname} Error: timeout exceeded")
        self.close()

    def wait_ends(self, waiting: str, started: float, last_input: float,
                  data_bytes: int) -> float:
        """When a wait for `waiting` ("command" or "data") that began at `started` ends, the
        client's last byte having come at `last_input` and `data_bytes` of DATA so far."""
        timeout = self.timeout_now()[0]
        # Idle: since the last byte, or since we began to wait if that came later.
        ends = max(last_input, started) + timeout
        if waiting == "command":
            return min(ends, started + timeout)
        return min(ends, started + timeout + data_bytes / self.min_data_rate)

    # -- command lines -----------------------------------------------------------------------
    def line_limit(self) -> int:
        """The longest command line allowed for what starts the buffer, CRLF included."""
        return COMMAND_LINE

    async def read_line(self, limit: int | None = None) -> bytes | None:
        """The next command line without its CRLF; None when the session is over (the
        client went, sent a bare LF, or made too many errors)."""
        self.expect("command")
        try:
            while True:
                if self._writing_paused:
                    # The client is not reading our replies: run nothing more until it does.
                    if not await self.more():
                        return None
                    continue
                if self._discarding or self._dropped is not None:
                    if self._discarding:
                        self._drop(b"")
                    if self._dropped is None:  # its end is still to come
                        if not await self.more():
                            return None
                        continue
                    ended_with_crlf, self._dropped = self._dropped, None
                    if not ended_with_crlf:
                        return self._bare_lf()
                    log_event("reject", stage="command", ip=self.client_ip,
                              reason="line too long")
                    if not self.error(LINE_TOO_LONG):
                        return None
                    continue
                end = self.buf.find(b"\n")
                allowed = limit if limit is not None else self.line_limit()
                if end >= 0 and end + 1 <= allowed:
                    if end == 0 or self.buf[end - 1] != 13:
                        return self._bare_lf()
                    line = bytes(self.buf[:end - 1])
                    del self.buf[:end + 1]
                    return line
                if end >= 0 or len(self.buf) > allowed:
                    self._discarding, self._discard_last = True, b""
                    continue
                if not await self.more():
                    return None
        finally:
            self.expect(None)

    def _drop(self, data: bytes | memoryview) -> None:
        """Drop an over-long line's bytes up to its LF: what is buffered, then `data` as
        it arrives (never stored). At the LF, _dropped says whether a CR came before it."""
        pending = bytes(self.buf) + bytes(data) if self.buf else bytes(data)
        self.buf.clear()
        end = pending.find(b"\n")
        if end < 0:
            self._discard_last = pending[-1:] or self._discard_last
            return
        before = pending[end - 1:end] if end > 0 else self._discard_last
        self.buf += pending[end + 1:]
        self._discarding = False
        self._dropped = before == b"\r"

    def _bare_lf(self) -> None:
        self.reply(BARE_LF)
        log_event("reject", stage="command", ip=self.client_ip, reason="bare LF")
        return None

    def error(self, reply: str) -> bool:
        """Answer a client error; after too many, end the session (False)."""
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            log_event("reject", stage="command", ip=self.client_ip, reason="too many errors")
            self.reply(f"421 4.7.0 {self.hostname} Error: too many errors")
            return False
        self.reply(reply)
        return True

    # -- output ------------------------------------------------------------------------------
    def reply(self, line: str) -> None:
        data = line.encode("utf-8", "surrogateescape") + b"\r\n"
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= REPLY_BATCH:
            self.flush()

    def flush(self) -> None:
        if self._out and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()
        self._out_bytes = 0

    def close(self) -> None:
        """Say what is pending and hang up. A client that does not read gets no more
        time: its unread replies are dropped with the connection."""
        self.flush()
        self._closed = True
        if self._writing_paused:
            self.transport.abort()
        else:
            self.transport.close()
        self._wake()

    async def blocking(self, call: Callable[[], Any]) -> Any:
        """Run slow blocking work (fsync under load, big reads, scrypt) off the event loop."""
        return await self.loop.run_in_executor(None, call)
