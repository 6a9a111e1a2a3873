"""An SMTP sink on 127.0.0.1 for integration tests (aiosmtpd in a thread).

    with SmtpSink() as sink:
        ... relay mail to 127.0.0.1:sink.port ...
        [msg] = sink.wait_for(1, timeout=10)
        assert msg.message()["Subject"] == "hello"

`reply={"RCPT": "451 4.3.0 try later"}` (or `set_reply`) makes the sink
refuse at that stage, to play a failing next hop. Stages: MAIL, RCPT, DATA
(DATA answers the end of the message, after the content was read).

`smtputf8=False` plays a next hop without SMTPUTF8 in its EHLO; `tls_context=` one that
offers STARTTLS with that context's certificate (each message records whether it came
over TLS).
"""
from __future__ import annotations

import email
import email.message
import email.policy
import errno
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller

from tests.harness.ports import LOOPBACK, free_port

STAGES = ("MAIL", "RCPT", "DATA")


@dataclass(frozen=True)
class SinkMessage:
    """One message as the sink received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    # The DATA content as it came off the wire (CRLF, dots unstuffed), not re-encoded.
    data: bytes
    peer: tuple[str, int]
    helo: str | None
    mail_options: tuple[str, ...] = ()
    rcpt_options: tuple[str, ...] = ()
    received_at: float = field(default_factory=time.time)
    tls: bool = False  # the session had done STARTTLS

    def message(self) -> email.message.EmailMessage:
        """The content parsed with the modern email policy (decodes RFC 2047 headers)."""
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


@dataclass(frozen=True)
class SinkRefusal:
    """A command the sink refused because of a configured reply."""

    stage: str
    reply: str
    mail_from: str | None
    rcpt_tos: tuple[str, ...]
    address: str | None = None
    data: bytes | None = None


class _Handler:
    """aiosmtpd handler; runs in the controller's event-loop thread."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any,
                          address: str, mail_options: list[str]) -> str:
        refuse = self.sink._reply_for("MAIL")
        if refuse:
            self.sink._refused(SinkRefusal("MAIL", refuse, address, (), address))
            return refuse
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,
                          address: str, rcpt_options: list[str]) -> str:
        refuse = self.sink._reply_for("RCPT")
        if refuse:
            self.sink._refused(SinkRefusal(
                "RCPT", refuse, envelope.mail_from, tuple(envelope.rcpt_tos), address))
            return refuse
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content
        if raw is None:  # only with decode_data=True, which we never set
            raw = envelope.content if isinstance(envelope.content, bytes) else b""
        refuse = self.sink._reply_for("DATA")
        if refuse:
            self.sink._refused(SinkRefusal(
                "DATA", refuse, envelope.mail_from, tuple(envelope.rcpt_tos), None, raw))
            return refuse
        peer = session.peer if isinstance(session.peer, tuple) else (str(session.peer), 0)
        self.sink._store(SinkMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=raw,
            peer=(str(peer[0]), int(peer[1])),
            helo=session.host_name,
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
            tls=session.ssl is not None,
        ))
        return "250 2.0.0 OK: stored"


class SmtpSink:
    """SMTP server on 127.0.0.1:<free port> that keeps every message it accepts."""

    def __init__(self, reply: Mapping[str, str] | None = None, *,
                 data_size_limit: int = 64 * 1024 * 1024,
                 server_hostname: str = "sink.mailmoat.test", smtputf8: bool = True,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.data_size_limit = data_size_limit
        self.server_hostname = server_hostname
        self.smtputf8, self.tls_context = smtputf8, tls_context
        self._cond = threading.Condition()
        self._messages: list[SinkMessage] = []
        self._refusals: list[SinkRefusal] = []
        self._replies: dict[str, str] = {}
        for stage, text in (reply or {}).items():
            self.set_reply(stage, text)
        self._controller: Controller | None = None

    # -- configuration ---------------------------------------------------------

    def set_reply(self, stage: str, reply: str | None) -> None:
        """Answer `stage` (MAIL, RCPT, DATA) with `reply`, e.g. "550 5.1.1 no".

        None restores the normal 250.
        """
        stage = stage.upper()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        if reply is not None and not (len(reply) >= 3 and reply[:3].isdigit()
                                      and reply[0] in "45"):
            raise ValueError(f"reply must start with a 4xx or 5xx code: {reply!r}")
        with self._cond:
            if reply is None:
                self._replies.pop(stage, None)
            else:
                self._replies[stage] = reply

    # -- life cycle ------------------------------------------------------------

    def start(self) -> SmtpSink:
        # free_port() can race with other processes: retry on EADDRINUSE.
        last: OSError | None = None
        for _ in range(5):
            self.port = free_port()
            controller = Controller(
                _Handler(self), hostname=self.host, port=self.port,
                server_hostname=self.server_hostname, ready_timeout=5.0,
                enable_SMTPUTF8=self.smtputf8, data_size_limit=self.data_size_limit,
                tls_context=self.tls_context,
            )
            try:
                controller.start()
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                last = exc
                continue
            self._controller = controller
            return self
        raise RuntimeError(f"SmtpSink could not bind a port: {last}")

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- results ---------------------------------------------------------------

    @property
    def messages(self) -> list[SinkMessage]:
        """A snapshot of the accepted messages, oldest first."""
        with self._cond:
            return list(self._messages)

    @property
    def refusals(self) -> list[SinkRefusal]:
        """A snapshot of the commands refused by a configured reply."""
        with self._cond:
            return list(self._refusals)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Block until at least `count` messages were accepted; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"sink got {len(self._messages)} of {count} messages in {timeout:.1f}s"
                        f" (refusals: {len(self._refusals)})")
                self._cond.wait(remaining)
            return list(self._messages)

    def wait_for_refusals(self, count: int, timeout: float = 10.0) -> list[SinkRefusal]:
        """Block until at least `count` commands were refused; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._refusals) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"sink refused {len(self._refusals)} of {count} commands in {timeout:.1f}s")
                self._cond.wait(remaining)
            return list(self._refusals)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()
            self._refusals.clear()

    # -- called from the handler thread ----------------------------------------

    def _reply_for(self, stage: str) -> str | None:
        with self._cond:
            return self._replies.get(stage)

    def _store(self, message: SinkMessage) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def _refused(self, refusal: SinkRefusal) -> None:
        with self._cond:
            self._refusals.append(refusal)
            self._cond.notify_all()
