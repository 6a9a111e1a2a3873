"""Delivery agents: SMTP relay to a next hop, and Maildir for local use.

Each agent takes one message and a list of recipients and answers per recipient with a
status (delivered, deferred, bounced) and the remote reply, as Postfix's delivery agents do:
4xx and network errors defer, 5xx bounces.
"""
from __future__ import annotations

import encodings.punycode
import logging
import os
import re
import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from milters.core.config import GatewayConfig, RelayTarget
from milters.core.eventlog import log_event
from milters.core.policy.matching import normalize_domain

from mta.queue.spool import StoredMessage
from mta.smtp_in.data import dot_stuffed
from . import smtputf8
from .maildir_names import header_text, mailbox_name
from .outbound_tls import RETRY_PLAIN, TlsPolicy, TlsRefused, secure

DELIVERED, DEFERRED, BOUNCED = "delivered", "deferred", "bounced"
Reply = tuple[int, bytes]
Begun = tuple[Reply, bool]  # MAIL's reply; whether RCPT and DATA went out with it


@dataclass(frozen=True)
class Outcome:
    status: str
    reply: str


@dataclass(frozen=True)
class DeliveryOptions:
    """What an agent needs to know about the message beyond its addresses and text."""

    queue_id: str = ""  # for the agent's own log lines
    smtputf8: bool = False  # SMTPUTF8 was asked for on MAIL (mta/delivery/smtputf8.py)


NO_OPTIONS = DeliveryOptions()


class Agent(Protocol):
    def deliver(self, sender: str, recipients: list[str], message: StoredMessage,
                options: DeliveryOptions = NO_OPTIONS) -> dict[str, Outcome]: ...

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


@dataclass(frozen=True)
class MaildirDelivery:
    """One Maildir per recipient address under `root` (local use and tests), named by
    mta/delivery/maildir_names.py so that no address can reach outside `root`."""

    root: Path

    def deliver(self, sender: str, recipients: list[str], message: StoredMessage,
                options: DeliveryOptions = NO_OPTIONS) -> dict[str, Outcome]:
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
        box = self.root / mailbox_name(rcpt)
        if box.parent != self.root:  # mailbox_name makes one component; fail closed anyway
            raise OSError(f"mailbox name for {rcpt!r} is not one path component")
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}.P{os.getpid()}.{socket.gethostname()}"
        tmp = box / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out, open(message.path, "rb") as source:
                out.write(f"Return-Path: <{header_text(sender)}>\r\n"
                          f"Delivered-To: {header_text(rcpt)}\r\n".encode("utf-8",
                                                                          "surrogateescape"))
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


def canonical_domain(domain: str) -> str | None:
    """A domain's one routing form, its A-labels (IDNA 2008 via normalize_domain); None when
    it has none, or when its Unicode form is not the U-label its A-label stands for: a
    look-alike that only a mapping (full-width letters, IDNA 2003's NFKC) turns into another
    name is not that name."""
    canonical = normalize_domain(domain)
    if not canonical or not canonical.isascii():
        return None
    written = domain.strip().rstrip(".").lower()
    if not written.isascii():
        try:
            labels = [encodings.punycode.punycode_decode(label[4:], "strict")
                      if label.startswith("xn--") else label
                      for label in canonical.split(".")]
        except UnicodeError:
            return None
        if ".".join(labels) != written:
            return None
    return canonical


@dataclass(frozen=True)
class Router:
    """The agent for a recipient: a per-domain route (parent domains too), else the default.
    Route keys and recipient domains are compared in their A-label form only."""

    default: Agent
    routes: dict[str, Agent]

    def __post_init__(self) -> None:
        canonical = {}
        for domain, agent in self.routes.items():
            key = canonical_domain(domain)
            if key is None:
                raise ValueError(f"route domain '{domain}' is not a valid domain name")
            canonical[key] = agent
        object.__setattr__(self, "routes", canonical)

    def close_idle(self, everything: bool = False) -> None:
        for agent in [self.default, *self.routes.values()]:
            agent.close_idle(everything)

    def agent_for(self, recipient: str) -> Agent:
        domain = canonical_domain(recipient.rpartition("@")[2])
        while domain:  # None (no canonical form) matches no route
            if domain in self.routes:
                return self.routes[domain]
            domain = domain.partition(".")[2]
        return self.default


_SMTP_TARGET = re.compile(r"^smtp:\[?([^\]]+?)\]?(?::(\d+))?$")


def agent_for(route: RelayTarget | str, helo: str) -> Agent:
    """The agent for a relay route from the config: maildir:DIR or smtp:[host]:port, with
    the route's outbound TLS policy."""
    route = RelayTarget(route) if isinstance(route, str) else route
    if route.target.startswith("maildir:"):
        return MaildirDelivery(Path(route.target[len("maildir:"):]))
    match = _SMTP_TARGET.match(route.target)
    if not match:
        raise ValueError(f"relay target '{route.target}' is not smtp:[host]:port or "
                         f"maildir:DIR")
    return SmtpRelay(match.group(1), int(match.group(2) or 25), helo=helo,
                     tls=TlsPolicy(route.tls, route.ca_file))


def build_router(config: GatewayConfig) -> Router:
    return Router(agent_for(config.relay_default, config.hostname),
                  {domain: agent_for(route, config.hostname)
                   for domain, route in config.relay_routes.items()})
