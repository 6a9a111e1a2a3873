"""SMTP relay to a next hop, with STARTTLS as the route says and sessions kept for the next
message."""
from __future__ import annotations

import logging
import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from milters.core.eventlog import log_event

from mta.queue.spool import StoredMessage
from mta.smtp_in.data import dot_stuffed

from . import smtputf8
from .agent import BOUNCED, DEFERRED, DELIVERED, NO_OPTIONS, DeliveryOptions, Outcome
from .outbound_tls import RETRY_PLAIN, TlsPolicy, TlsRefused, secure

Reply = tuple[int, bytes]
Begun = tuple[Reply, bool]  # MAIL's reply; whether RCPT and DATA went out with it


def _reply_text(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return f"{code} {' '.join(text.split())}"


def _by_code(code: int, reply: str) -> Outcome:
    return Outcome(BOUNCED if code >= 500 else DEFERRED, reply)


class SessionCache:
    """Open sessions to one next hop, kept for the next message (Postfix's connection
    cache): a message then costs MAIL, RCPT and DATA, not a connect, greeting, EHLO and
    TLS handshake as well. Sessions idle longer than `idle_limit` are closed."""

    def __init__(self, idle_limit: float = 2.0, reuse_limit: int = 100) -> None:
        self.idle_limit, self.reuse_limit = idle_limit, reuse_limit
        self._idle: list[tuple[smtplib.SMTP, float, int]] = []  # session, since, uses
        self._lock = threading.Lock()

    def take(self) -> tuple[smtplib.SMTP, int] | None:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                client, since, uses = self._idle.pop()
                if now - since <= self.idle_limit:
                    return client, uses
                _quit(client)
        return None

    def give_back(self, client: smtplib.SMTP, uses: int) -> None:
        if uses >= self.reuse_limit:
            _quit(client)
            return
        with self._lock:
            self._idle.append((client, time.monotonic(), uses))

    def close_idle(self, everything: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [entry for entry in self._idle
                     if everything or now - entry[1] > self.idle_limit]
            self._idle = [entry for entry in self._idle if entry not in stale]
        for client, _, _ in stale:
            _quit(client)


def _quit(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        client.close()


@dataclass(frozen=True)
class SmtpRelay:
    """Relay to host:port with STARTTLS as the route's TLS policy says (outbound_tls.py; `may`
    by default, as Postfix). Sessions are reused for the next message while they are
    fresh (SessionCache)."""

    host: str
    port: int = 25
    helo: str = "localhost"
    timeout: float = 60.0
    tls: TlsPolicy = TlsPolicy()
    sessions: SessionCache = field(default_factory=SessionCache, compare=False, repr=False)

    def deliver(self, sender: str, recipients: list[str], message: StoredMessage,
                options: DeliveryOptions = NO_OPTIONS) -> dict[str, Outcome]:
        """Send the stored message file, streamed in blocks (a 25 MB message never sits in
        memory whole)."""
        where = f"{self.host}:{self.port}"
        utf8 = options.smtputf8 or not smtputf8.all_ascii(sender, *recipients)
        cached = self.sessions.take()
        if cached is not None:
            client, uses = cached
            refused = self._without_smtputf8(client, uses, utf8, sender, recipients, message)
            if refused is not None:
                return refused
            try:
                first = _begin(client, sender, recipients, utf8)
            except (OSError, smtplib.SMTPException):
                client.close()  # the next hop closed it meanwhile: start afresh below
            else:
                return self._guarded(client, where, recipients, lambda: self._transaction(
                    client, uses, first, recipients, message))
        try:
            client = self._open(where, options.queue_id)
        except TlsRefused as exc:
            return {rcpt: Outcome(DEFERRED, exc.reply) for rcpt in recipients}
        except smtplib.SMTPResponseException as exc:
            outcome = _by_code(exc.smtp_code, _reply_text(exc.smtp_code, exc.smtp_error))
            return {rcpt: outcome for rcpt in recipients}
        except (OSError, smtplib.SMTPException) as exc:
            outcome = Outcome(DEFERRED, f"451 4.4.1 connect to {where} failed: {exc}")
            return {rcpt: outcome for rcpt in recipients}
        refused = self._without_smtputf8(client, 0, utf8, sender, recipients, message)
        if refused is not None:
            return refused
        return self._guarded(client, where, recipients, lambda: self._transaction(
            client, 0, _begin(client, sender, recipients, utf8), recipients, message))

    def _open(self, where: str, queue_id: str) -> smtplib.SMTP:
        """A new session through EHLO and STARTTLS as the TLS policy says; raises TlsRefused
        when the policy requires TLS and this next hop cannot give it."""
        client = self._connect()
        try:
            state, why = secure(client, self.tls, where)
        except TlsRefused as exc:
            log_event("tls_refused", level=logging.WARNING, queue_id=queue_id, host=where,
                      tls=self.tls.level, reply=exc.reply)
            raise
        if state == RETRY_PLAIN:  # opportunistic TLS failed: plain text, as Postfix does
            log_event("tls_fallback", level=logging.WARNING, queue_id=queue_id, host=where,
                      reason=why)
            client = self._connect()
        return client

    def _connect(self) -> smtplib.SMTP:
        client = smtplib.SMTP(self.host, self.port, local_hostname=self.helo,
                              timeout=self.timeout)
        try:
            if client.sock is not None and client.sock.family != socket.AF_UNIX:
                # Commands and replies are small: no Nagle delay on any of them.
                client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.ehlo()
        except BaseException:
            client.close()
            raise
        return client

    def _without_smtputf8(self, client: smtplib.SMTP, uses: int, utf8: bool, sender: str,
                          recipients: list[str], message: StoredMessage
                          ) -> dict[str, Outcome] | None:
        """The bounce when the message needs SMTPUTF8 and this next hop does not offer it
        (RFC 6531 section 3.2: never downgraded, never retried); None to go on."""
        if not utf8 or client.has_extn("smtputf8"):
            return None
        if not smtputf8.needed(sender, recipients, message):
            return None  # asked for, but all ASCII: it goes out without (Postfix does too)
        self.sessions.give_back(client, uses)  # nothing was sent on it
        reply = (f"554 5.6.7 SMTPUTF8 is required, but was not offered by host "
                 f"{self.host}:{self.port}")
        return {rcpt: Outcome(BOUNCED, reply) for rcpt in recipients}

    @staticmethod
    def _guarded(client: smtplib.SMTP, where: str, recipients: list[str],
                 run: Callable[[], dict[str, Outcome]]) -> dict[str, Outcome]:
        """`run`'s outcomes; a failure midway defers (or bounces on a 5xx) every recipient
        and drops the session."""
        try:
            return run()
        except smtplib.SMTPResponseException as exc:
            outcome = _by_code(exc.smtp_code, _reply_text(exc.smtp_code, exc.smtp_error))
        except (OSError, smtplib.SMTPException) as exc:
            outcome = Outcome(DEFERRED, f"451 4.4.1 delivery to {where} failed: {exc}")
        client.close()
        return {rcpt: outcome for rcpt in recipients}

    def _transaction(self, client: smtplib.SMTP, uses: int, begun: Begun,
                     recipients: list[str], message: StoredMessage) -> dict[str, Outcome]:
        """RCPT and DATA after MAIL's reply (or their replies, when they went out with
        MAIL); the session goes back to the cache if it ended cleanly (a transaction cut
        short is reset first)."""
        (code, text), pipelined = begun
        outcomes: dict[str, Outcome] = {}
        if pipelined and code != 421:  # after a 421 the next hop says nothing more
            rcpt_replies = [client.getreply() for _ in recipients]
            data_reply = client.getreply()
        else:
            rcpt_replies = (client.rcpt(rcpt) for rcpt in recipients)
            data_reply = None
        if code != 250:
            outcomes = {r: _by_code(code, _reply_text(code, text)) for r in recipients}
            if data_reply is not None and data_reply[0] == 354:
                _empty_data(client)  # a next hop that took DATA anyway: end it
        else:
            accepted = []
            for rcpt, (code, text) in zip(recipients, rcpt_replies):
                if code in (250, 251):
                    accepted.append(rcpt)
                else:
                    outcomes[rcpt] = _by_code(code, _reply_text(code, text))
            if accepted:
                code, text = _send_data(client, message, data_reply)
                result = (Outcome(DELIVERED, _reply_text(code, text)) if code == 250
                          else _by_code(code, _reply_text(code, text)))
                outcomes.update({rcpt: result for rcpt in accepted})
            elif data_reply is not None and data_reply[0] == 354:
                _empty_data(client)
        if code == 421:  # the next hop is closing the session
            client.close()
        elif code != 250 and client.rset()[0] != 250:
            _quit(client)
        else:
            self.sessions.give_back(client, uses + 1)
        return outcomes

    def close_idle(self, everything: bool = False) -> None:
        self.sessions.close_idle(everything)


def _begin(client: smtplib.SMTP, sender: str, recipients: list[str], utf8: bool = False
           ) -> Begun:
    """Send MAIL (with SMTPUTF8 when `utf8` and the next hop offers it) and read its reply.
    When the next hop offers PIPELINING (RFC 2920), the RCPTs and DATA go out in the same
    write: one round trip for the envelope instead of one per command; _transaction reads
    their replies."""
    utf8 = utf8 and client.has_extn("smtputf8")
    if not client.has_extn("pipelining"):
        # smtplib sends this and the RCPTs as UTF-8 after an SMTPUTF8 MAIL.
        return client.mail(sender, ["SMTPUTF8"] if utf8 else []), False
    commands = [f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if utf8 else "")]
    commands += [f"RCPT TO:<{rcpt}>" for rcpt in recipients]
    text = "".join(f"{command}\r\n" for command in commands) + "DATA\r\n"
    client.send(text.encode("utf-8" if utf8 else "ascii"))
    return client.getreply(), True


def _empty_data(client: smtplib.SMTP) -> None:
    """End a DATA the next hop accepted although no recipient was (RFC 2920 section 3.1:
    the client must send the terminating dot); its reply does not matter."""
    client.send(".\r\n")
    client.getreply()


def _send_data(client: smtplib.SMTP, message: StoredMessage,
               data_reply: Reply | None = None) -> Reply:
    """DATA with the message streamed from its file (smtplib's data() wants it whole);
    `data_reply` is DATA's reply when DATA went out pipelined."""
    code, text = client.docmd("DATA") if data_reply is None else data_reply
    if code != 354:
        return code, text
    # The terminator goes out with the last block: sent alone right after it, Nagle would
    # hold it until the next hop's delayed ACK (40 ms a message).
    last = b""
    for block in dot_stuffed(message.path, message.size):
        if last:
            client.send(last)
        last = block
    client.send(last + b".\r\n")
    return client.getreply()
