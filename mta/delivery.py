"""Delivery agents: SMTP relay to a next hop, and Maildir for local use.

Each agent takes one message and a list of recipients and answers per recipient with a
status (delivered, deferred, bounced) and the remote reply, as Postfix's delivery agents do:
4xx and network errors defer, 5xx bounces.
"""
from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from milters.core.config import GatewayConfig

from .queue import StoredMessage
from .smtp_data import dot_stuffed

DELIVERED, DEFERRED, BOUNCED = "delivered", "deferred", "bounced"
Reply = tuple[int, bytes]
Begun = tuple[Reply, bool]  # MAIL's reply; whether RCPT and DATA went out with it


@dataclass(frozen=True)
class Outcome:
    status: str
    reply: str


class Agent(Protocol):
    def deliver(self, sender: str, recipients: list[str], message: StoredMessage
                ) -> dict[str, Outcome]: ...

    def close_idle(self, everything: bool = False) -> None:
        """Close kept sessions idle too long (all of them with `everything`)."""


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
    """Relay to host:port; STARTTLS when the next hop offers it (opportunistic, like
    Postfix's smtp_tls_security_level=may: no certificate check). Sessions are reused
    for the next message while they are fresh (SessionCache)."""

    host: str
    port: int = 25
    helo: str = "localhost"
    timeout: float = 60.0
    sessions: SessionCache = field(default_factory=SessionCache, compare=False, repr=False)

    def deliver(self, sender: str, recipients: list[str], message: StoredMessage
                ) -> dict[str, Outcome]:
        """Send the stored message file, streamed in blocks (a 25 MB message never sits in
        memory whole)."""
        where = f"{self.host}:{self.port}"
        cached = self.sessions.take()
        if cached is not None:
            client, uses = cached
            try:
                first = _begin(client, sender, recipients)
            except (OSError, smtplib.SMTPException):
                client.close()  # the next hop closed it meanwhile: start afresh below
            else:
                return self._guarded(client, where, recipients, lambda: self._transaction(
                    client, uses, first, recipients, message))
        try:
            client = smtplib.SMTP(self.host, self.port, local_hostname=self.helo,
                                  timeout=self.timeout)
        except smtplib.SMTPResponseException as exc:
            outcome = _by_code(exc.smtp_code, _reply_text(exc.smtp_code, exc.smtp_error))
            return {rcpt: outcome for rcpt in recipients}
        except (OSError, smtplib.SMTPException) as exc:
            outcome = Outcome(DEFERRED, f"451 4.4.1 connect to {where} failed: {exc}")
            return {rcpt: outcome for rcpt in recipients}

        def fresh_session() -> dict[str, Outcome]:
            if client.sock is not None and client.sock.family != socket.AF_UNIX:
                # Commands and replies are small: no Nagle delay on any of them.
                client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.ehlo()
            if client.has_extn("starttls"):
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                client.starttls(context=context)
                client.ehlo()
            return self._transaction(client, 0, _begin(client, sender, recipients),
                                     recipients, message)
        return self._guarded(client, where, recipients, fresh_session)

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


def _begin(client: smtplib.SMTP, sender: str, recipients: list[str]) -> Begun:
    """Send MAIL and read its reply. When the next hop offers PIPELINING (RFC 2920), the
    RCPTs and DATA go out in the same write: one round trip for the envelope instead of
    one per command; _transaction reads their replies."""
    if not client.has_extn("pipelining"):
        return client.mail(sender), False
    commands = [f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{rcpt}>" for rcpt in recipients]
    client.send("".join(f"{command}\r\n" for command in commands) + "DATA\r\n")
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


@dataclass(frozen=True)
class MaildirDelivery:
    """One Maildir per recipient address under `root` (local use and tests)."""

    root: Path

    def deliver(self, sender: str, recipients: list[str], message: StoredMessage
                ) -> dict[str, Outcome]:
        outcomes = {}
        for rcpt in recipients:
            try:
                name = self._store(rcpt, sender, message)
                outcomes[rcpt] = Outcome(DELIVERED, f"250 2.0.0 delivered to maildir as {name}")
            except OSError as exc:
                outcomes[rcpt] = Outcome(DEFERRED, f"451 4.3.0 maildir: {exc.strerror or exc}")
        return outcomes

    def close_idle(self, everything: bool = False) -> None:
        return None  # nothing is kept open

    def _store(self, rcpt: str, sender: str, message: StoredMessage) -> str:
        box = self.root / rcpt.lower().replace("/", "_")
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}.P{os.getpid()}.{socket.gethostname()}"
        tmp = box / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out, open(message.path, "rb") as source:
                out.write(f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode())
                left = message.size
                while left > 0:
                    block = source.read(min(left, 1 << 20))
                    if not block:
                        break
                    out.write(block)
                    left -= len(block)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, box / "new" / name)
        return name


@dataclass(frozen=True)
class Router:
    """The agent for a recipient: a per-domain route, else the default."""

    default: Agent
    routes: dict[str, Agent]

    def close_idle(self, everything: bool = False) -> None:
        for agent in [self.default, *self.routes.values()]:
            agent.close_idle(everything)

    def agent_for(self, recipient: str) -> Agent:
        domain = recipient.rpartition("@")[2].lower().rstrip(".")
        while domain:
            if domain in self.routes:
                return self.routes[domain]
            domain = domain.partition(".")[2]
        return self.default


_SMTP_TARGET = re.compile(r"^smtp:\[?([^\]]+?)\]?(?::(\d+))?$")


def agent_for(target: str, helo: str) -> Agent:
    """The agent for a relay target from the config: maildir:DIR or smtp:[host]:port."""
    if target.startswith("maildir:"):
        return MaildirDelivery(Path(target[len("maildir:"):]))
    match = _SMTP_TARGET.match(target)
    if not match:
        raise ValueError(f"relay target '{target}' is not smtp:[host]:port or maildir:DIR")
    return SmtpRelay(match.group(1), int(match.group(2) or 25), helo=helo)


def build_router(config: GatewayConfig) -> Router:
    return Router(agent_for(config.relay_default, config.hostname),
                  {domain: agent_for(target, config.hostname)
                   for domain, target in config.relay_routes.items()})
