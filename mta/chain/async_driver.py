"""The event-loop driver of the milter protocol steps (client.py's g_* generators): how
`serve` talks to its milters.

The steps are resumed from the socket's own callbacks: a reply is handled in the read
callback that received it, the next packet goes out from there, and only the stage's result
wakes the SMTP session (one future per stage; no task, coroutine or future per packet).
Each wait has a deadline, checked by one timer per stage that is re-armed only when it fires
before the deadline (a progress packet or the next read moves the deadline on without a
timer of its own). Sockets are plain non-blocking ones with a reader for the session.
"""
from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from milters.core.errors import MilterProtocolError
from milters.core.milter_protocol import encode_packet

from mta.aio.reads import shared_buffer
from mta.aio.session_runner import ResumesDirectly

from .client import MilterClient, Steps, closed_error, failure
from .stream import new_socket, socket_address

T = TypeVar("T")
HIGH_WATER = 64 * 1024  # unsent bytes above this make a step wait (big bodies, slow milter)
UNIX_RETRY = 0.01  # s: a unix socket with a full backlog refuses at once; try again soon
LINGER = 5.0  # s: the longest a half-closed socket waits for the milter to close its end
Request = tuple[str, MilterClient, Any]


class MilterSocket:
    """One milter connection on the event loop. What arrives goes into the client's inbox;
    writes go straight to the socket, and what does not fit waits for room. The run whose
    step waits on this connection is poked whenever something changes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: MilterClient,
                 family: int) -> None:
        self.loop, self.client = loop, client
        self.sock = new_socket(family)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.connected = False
        self.closed = False
        self.error: OSError | None = None  # why connecting failed
        self.backlog = bytearray()  # written by us, not yet taken by the socket
        self.waiter: Run[Any] | None = None
        self._connecting: asyncio.TimerHandle | None = None

    # -- connecting ------------------------------------------------------------------------
    def connect(self, address: Any) -> bool:
        """Start connecting; True when done at once (the usual case on a unix socket)."""
        try:
            self.sock.connect(address)
        except (BlockingIOError, InterruptedError):
            if self.sock.family == socket.AF_UNIX:  # a full backlog: nothing in progress
                self._connecting = self.loop.call_later(UNIX_RETRY, self._retry, address)
            else:
                self.loop.add_writer(self.fd, self._tcp_done)
            return False
        self._open()
        return True

    def _retry(self, address: Any) -> None:
        self._connecting = None
        if self.closed:
            return
        try:
            if not self.connect(address):
                return  # still full: tried again later
        except OSError as exc:
            self.error = exc
            self.close()  # wakes the run with the error
            return
        self._wake()

    def _tcp_done(self) -> None:
        self.loop.remove_writer(self.fd)
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.error = OSError(code, os.strerror(code))
            self.close()
        else:
            self._open()
        self._wake()

    def _open(self) -> None:
        self.connected = True
        self.loop.add_reader(self.fd, self._readable)

    # -- reading and writing ---------------------------------------------------------------
    def _readable(self) -> None:
        buffer = shared_buffer()
        try:
            count = self.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            count = 0  # reset by the milter: as good as closed
        if count:
            with memoryview(buffer) as view, view[:count] as data:
                self.client.inbox += data
        else:
            self._stop_io()
        self._wake()

    def send(self, data: bytes) -> bool:
        """Queue `data`; False while too much is still unsent (wait for room)."""
        if self.closed:
            raise closed_error(self.client)
        if not self.backlog:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return True
            self.backlog += memoryview(data)[sent:]
            self.loop.add_writer(self.fd, self._writable)
        else:
            self.backlog += data
        return self.has_room()

    def has_room(self) -> bool:
        return len(self.backlog) <= HIGH_WATER

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self.backlog)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._stop_io()
            self._wake()
            return
        del self.backlog[:sent]
        if not self.backlog:
            self.loop.remove_writer(self.fd)
        if self.has_room():
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None:
            self.waiter.poke(self)

    def _stop_io(self) -> None:
        """No more reading or writing (closed by either side)."""
        if self.closed:
            return
        self.closed = True
        if self.connected:
            self.loop.remove_reader(self.fd)
        if self.backlog or (not self.connected and self._connecting is None):
            self.loop.remove_writer(self.fd)  # a pending write, or a TCP connect
        self.backlog.clear()
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None

    def close(self, unsent: bytes = b"") -> None:
        """Say goodbye (QUIT, after the `unsent` no-reply packets) if the socket takes it
        at once, and close. Never blocks. libmilter drops what it has not read yet once
        the other end is closed, so with `unsent` packets the socket is only half-closed,
        and closed when the milter has closed its end (or after LINGER seconds)."""
        said = False
        if not self.closed and self.connected and not self.backlog:
            try:
                self.sock.send(unsent + encode_packet(b"Q"))
                said = True
            except OSError:
                pass  # gone already, or no room: nothing more to tell it
        self._stop_io()
        if said and unsent:
            self._linger()
        else:
            self.sock.close()
        self._wake()

    def _linger(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.sock.close()
            return
        timer = self.loop.call_later(LINGER, self._end_linger)

        def drain() -> None:
            try:
                if self.sock.recv(4096):
                    return  # nothing is expected after QUIT; read and forget it
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            timer.cancel()
            self._end_linger()
        self.loop.add_reader(self.fd, drain)

    def _end_linger(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.fd)
            self.sock.close()


class Run(ResumesDirectly, Generic[T]):
    """One run of protocol steps; `future` gets their value, or the exception of a bug.
    Milter failures (MilterProtocolError) go into the steps, where the chain applies the
    milter's on_failure. An SMTP session awaits the run itself (see begin())."""

    def __init__(self, loop: asyncio.AbstractEventLoop, steps: Steps[T]) -> None:
        self.loop, self.steps = loop, steps
        self.future: asyncio.Future[T] = loop.create_future()
        self._waiting: Request | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._then: Callable[[], None] | None = None

    def __await__(self) -> Generator[Any, None, T]:
        if not self.future.done():
            yield self  # to the SessionRunner, which calls resume_with()
        return self.future.result()

    def resume_with(self, callback: Callable[[], None]) -> None:
        self._then = callback

    def _done(self) -> None:
        self._stop()
        then, self._then = self._then, None
        if then is not None:
            then()

    def resume(self, result: Any = None, error: BaseException | None = None) -> None:
        """Advance the steps until one has to wait, or they are done."""
        steps = self.steps
        while True:
            if self.future.done():  # cancelled: the SMTP session went away
                self._stop()
                steps.close()
                return
            try:
                request = steps.throw(error) if error is not None else steps.send(result)
            except StopIteration as done:
                self.future.set_result(done.value)
                self._done()
                return
            except Exception as exc:  # a bug: to whoever awaits the stage
                self.future.set_exception(exc)
                self._done()
                return
            result, error = None, None
            kind, client, arg = request
            try:
                if kind == "read":
                    result = client.take_packet()
                    if result is None:
                        if _stream(client).closed:
                            raise closed_error(client)
                        self._wait(request, arg)
                        return
                elif kind == "send":
                    if not _stream(client).send(arg):
                        self._wait(request, client.send_timeout)
                        return
                elif not self._open(client):  # "open"
                    self._wait(request, client.endpoint.connect_timeout)
                    return
            except (OSError, MilterProtocolError) as exc:
                error = failure(client, kind, arg, exc)

    def poke(self, stream: MilterSocket) -> None:
        """Something happened on the connection this run waits on: go on if the step can."""
        waiting = self._waiting
        if waiting is None:
            return
        kind, client, arg = waiting
        try:
            if kind == "read":
                result = client.take_packet()
                if result is None:
                    if not stream.closed:
                        return
                    raise closed_error(client)
            elif stream.closed:  # "send" or "open"
                raise stream.error or closed_error(client)
            elif not (stream.has_room() if kind == "send" else stream.connected):
                return
            else:
                result = None
        except (OSError, MilterProtocolError) as exc:
            self._release()
            if kind == "open":
                _forget(client)
            self.resume(error=failure(client, kind, arg, exc))
            return
        self._release()
        self.resume(result)

    def _open(self, client: MilterClient) -> bool:
        family, address = socket_address(client.endpoint.socket)
        stream = client.stream = MilterSocket(self.loop, client, family)
        client.sock = stream.sock  # the steps' "connected" marker
        try:
            return stream.connect(address)
        except OSError:
            _forget(client)
            raise

    # -- waiting ---------------------------------------------------------------------------
    def _wait(self, request: Request, timeout: float) -> None:
        self._waiting = request
        _stream(request[1]).waiter = self
        self._deadline = deadline = self.loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        waiting = self._waiting
        if waiting is None:
            return
        if self.future.done():  # cancelled while waiting
            self._release()
            self.steps.close()
            return
        if self.loop.time() < self._deadline:  # moved on since this timer was set
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            return
        kind, client, arg = waiting
        self._release()
        if kind == "open":
            _forget(client)
        self.resume(error=failure(client, kind, arg, TimeoutError()))

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and waiting[1].stream is not None:
            waiting[1].stream.waiter = None

    def _stop(self) -> None:
        self._release()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _stream(client: MilterClient) -> MilterSocket:
    if client.stream is None:
        raise closed_error(client)
    return client.stream


def _forget(client: MilterClient) -> None:
    """Drop a connection that was never made."""
    if client.stream is not None:
        client.stream.waiter = None
        client.stream.close()
    client.stream, client.sock = None, None


def begin(steps: Steps[T]) -> Run[T]:
    """Start protocol steps on the running loop now. Steps that need no reply are done
    before this returns. An SMTP session (SessionRunner) awaits the run itself and goes on
    in the callback that finishes it; anyone else awaits run.future."""
    run = Run(asyncio.get_running_loop(), steps)
    run.resume()
    return run


def drive(steps: Steps[T]) -> asyncio.Future[T]:
    """begin(steps).future: for awaiting outside an SMTP session, and for keeping."""
    return begin(steps).future
