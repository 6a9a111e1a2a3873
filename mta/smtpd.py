"""SMTP in: aiosmtpd with the gateway's rules, the milter chain at each stage, and the
durable queue behind the final 250.

- EHLO adds PIPELINING and ENHANCEDSTATUSCODES to aiosmtpd's SIZE, 8BITMIME and SMTPUTF8.
- Relay control: a recipient is accepted from internal networks, or for a relay domain;
  address tricks (`%`, `!`, source routes, quoted local parts with `@`, trailing dots) are
  refused from everyone else.
- DATA with a bare LF or bare CR is refused (SMTP smuggling, CVE-2023-51764): only CRLF
  line ends, and aiosmtpd only ends data at CRLF.CRLF.
- Milter verdicts from connect and HELO are given at MAIL FROM, as Postfix does by default.
- The final 250 comes only after the queue has the message on disk; a spool failure is
  452 4.3.1.
- XCLIENT (Postfix's) lets authorized loopback clients present another client address,
  which is how the tests act as outside clients while staying on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from milters.core.eventlog import log_event
from milters.core.policy.matching import (AddressPattern, NetworkPattern, match_address,
                                          network_matches, normalize_domain)
from milters.core.verdict import Action, Verdict

from .edits_apply import Transit, split_message
from .metrics import METRICS
from .milter_chain import ChainSession, connect_macros, mail_macros, rcpt_macros
from .queue import Envelope as QueueEnvelope
from .queue import Queue, RecipientState, SpoolError, new_queue_id

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_TRICKS = re.compile(r"[%!]|^@|:.*@|\.$|^\".*@.*\"@")


@dataclass(frozen=True)
class SmtpSettings:
    hostname: str
    internal_networks: tuple[NetworkPattern, ...]
    relay_domains: tuple[str, ...] = ()
    xclient_networks: tuple[NetworkPattern, ...] = ()
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_header_bytes: int = 1024 * 1024
    idle_timeout: float = 300.0
    max_connections: int = 200
    max_connections_per_ip: int = 20
    tls_context: ssl.SSLContext | None = None  # STARTTLS is offered when set
    # Who exists in the relay domains (SaMMA patterns); empty: every address is accepted.
    valid_recipients: tuple[AddressPattern, ...] = ()
    loopback_only: bool = False  # the re-injection listener: local notices and split copies


def _reply(verdict: Verdict) -> str:
    return str(verdict.reply) if verdict.reply else {
        Action.REJECT: "550 5.7.1 Rejected", Action.TEMPFAIL: "451 4.7.1 Try again later",
    }.get(verdict.action, "250 2.0.0 Ok")


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def recipient_problem(address: str) -> str | None:
    """Why an address is refused on syntax alone (the classic open-relay tricks), or None."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or _TRICKS.search(address):
        return "501 5.1.3 Bad recipient address syntax"
    return None


class GatewayHandler:
    def __init__(self, settings: SmtpSettings, queue: Queue,
                 chain_factory: Callable[[], ChainSession] | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.chain_factory = chain_factory
        self.connections: dict[str, int] = {}  # open connections per client IP

    def admit_connection(self, ip: str) -> str | None:
        """Count a new connection; the 421 reply when it is one too many."""
        total = sum(self.connections.values())
        if total >= self.settings.max_connections:
            return f"421 4.7.0 {self.settings.hostname} Error: too many connections"
        if self.connections.get(ip, 0) >= self.settings.max_connections_per_ip:
            return f"421 4.7.0 {self.settings.hostname} Error: too many connections from {ip}"
        self.connections[ip] = self.connections.get(ip, 0) + 1
        return None

    def release_connection(self, ip: str) -> None:
        left = self.connections.get(ip, 0) - 1
        if left > 0:
            self.connections[ip] = left
        else:
            self.connections.pop(ip, None)

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    async def _blocking(call: Callable[[], Any]) -> Any:
        """Milter I/O and fsync are blocking: run them off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, call)

    def _client(self, session: Session) -> str:
        return getattr(session, "xclient_addr", None) or (session.peer[0] if session.peer
                                                           else "")

    def _internal(self, session: Session) -> bool:
        try:
            address = ipaddress.ip_address(self._client(session))
        except ValueError:
            return False
        return network_matches(address, self.settings.internal_networks)

    @staticmethod
    def _loopback(session: Session) -> bool:
        try:
            return ipaddress.ip_address(session.peer[0] if session.peer else "").is_loopback
        except ValueError:
            return False

    def _relay_domain(self, address: str) -> bool:
        domain = normalize_domain(address.rpartition("@")[2])
        return any(domain == d or domain.endswith("." + d) for d in self.settings.relay_domains)

    async def _chain(self, server: SMTP, session: Session) -> ChainSession | None:
        if self.chain_factory is None:
            return None
        chain = getattr(session, "chain", None)
        if chain is None:
            chain = session.chain = self.chain_factory()
            client = self._client(session)
            family = socket.AF_INET6 if ":" in client else socket.AF_INET
            port = session.peer[1] if session.peer else 0
            verdict = await self._blocking(lambda: chain.connect(
                f"[{client}]", client, port, family, connect_macros(self.settings.hostname,
                                                                     client)))
            if verdict.ends_transaction:
                session.early_verdict = verdict
        return chain

    # -- SMTP stages -----------------------------------------------------------------------
    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        await self._helo(server, session, hostname)
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        if self.xclient_allowed(session):
            extra.append("250-XCLIENT ADDR NAME HELO")
        return responses[:-1] + extra + [responses[-1]]

    def xclient_allowed(self, session: Session) -> bool:
        try:
            peer = ipaddress.ip_address(session.peer[0] if session.peer else "")
        except ValueError:
            return False
        return network_matches(peer, self.settings.xclient_networks)

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname
        await self._helo(server, session, hostname)
        return f"250 {self.settings.hostname}"

    async def _helo(self, server: SMTP, session: Session, hostname: str) -> None:
        chain = await self._chain(server, session)
        if chain is not None and not getattr(session, "early_verdict", None):
            verdict = await self._blocking(lambda: chain.helo(hostname))
            if verdict.ends_transaction:
                session.early_verdict = verdict

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.settings.loopback_only and not self._loopback(session):
            return "554 5.7.1 Re-injection is for local clients only"
        early = getattr(session, "early_verdict", None)
        if early is not None:
            return _reply(early)
        chain = await self._chain(server, session)
        # The queue ID exists from MAIL FROM on, so milters and our logs name the same ID.
        session.queue_id = new_queue_id()
        if chain is not None:
            verdict = await self._blocking(lambda: chain.mail(
                address, list(mail_options), mail_macros(session.queue_id, address)))
            if verdict.ends_transaction:
                return _reply(verdict)
        envelope.mail_from, envelope.mail_options = address, list(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        internal = self._internal(session)
        if not internal:
            problem = recipient_problem(address)
            if problem:
                return problem
            if not self._relay_domain(address):
                METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
                log_event("reject", stage="rcpt", ip=self._client(session), rcpt=address,
                          reason="relay access denied")
                return f"554 5.7.1 <{address}>: Relay access denied"
        if (self.settings.valid_recipients and self._relay_domain(address)
                and not match_address(address, self.settings.valid_recipients).matched):
            METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
            log_event("reject", stage="rcpt", ip=self._client(session), rcpt=address,
                      reason="unknown recipient")
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        chain = getattr(session, "chain", None)
        if chain is not None:
            verdict = await self._blocking(lambda: chain.rcpt(
                address, list(rcpt_options), rcpt_macros(session.queue_id, address)))
            if verdict.ends_transaction:
                return _reply(verdict)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        chain = getattr(session, "chain", None)
        if chain is not None:
            await self._blocking(chain.abort)
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw: bytes = envelope.original_content or b""
        client = self._client(session)
        METRICS.count("mailmoat_messages_received_total")
        if _BARE_LF.search(raw) or _BARE_CR.search(raw):
            METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
            log_event("reject", stage="data", ip=client, reason="bare LF or CR")
            return "554 5.6.0 Message refused: bare LF or CR in the data; send CRLF line ends"
        fields, _ = split_message(raw)
        if sum(map(len, fields)) > self.settings.max_header_bytes:
            return "552 5.3.4 Message header too large"
        transit = Transit(raw, envelope.mail_from or "", [(r, None) for r in envelope.rcpt_tos])
        chain = getattr(session, "chain", None)
        if chain is not None:
            verdict, transit = await self._blocking(
                lambda: chain.message(transit, {"i": session.queue_id}))
            if verdict.action is Action.DISCARD:
                log_event("discarded", ip=client, sender=transit.sender)
                return "250 2.0.0 Ok: discarded"
            if verdict.ends_transaction and verdict.action is not Action.ACCEPT:
                return _reply(verdict)
        if not transit.recipients:
            return "250 2.0.0 Ok: no recipients left"
        queue_envelope = QueueEnvelope(
            session.queue_id, transit.sender,
            [RecipientState(address, params) for address, params in transit.recipients],
            received_at=time.time(), client_ip=client, helo=session.host_name,
            hold_reason=transit.quarantine)
        try:
            queue_id = await self._blocking(lambda: self.queue.enqueue(transit.raw,
                                                                      queue_envelope))
        except SpoolError as exc:
            log_event("spool_error", ip=client, error=str(exc))
            return "452 4.3.1 Insufficient system storage"
        METRICS.count("mailmoat_messages_queued_total")
        log_event("queued", queue_id=queue_id, ip=client, sender=transit.sender,
                  nrcpt=len(transit.recipients), size=len(transit.raw),
                  held=transit.quarantine)
        return f"250 2.0.0 Ok: queued as {queue_id}"


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with XCLIENT for authorized hosts and the chain closed at the end."""

    def __init__(self, handler: GatewayHandler, **kwargs: Any) -> None:
        settings = handler.settings
        super().__init__(handler, hostname=settings.hostname, ident="ESMTP mailmoat",
                         enable_SMTPUTF8=True, tls_context=settings.tls_context,
                         data_size_limit=settings.max_message_size,
                         timeout=settings.idle_timeout, **kwargs)
        self.gateway = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None  # the same client, now encrypted
        super().connection_made(transport)
        if starttls:
            return
        self._counted_ip: str | None = None
        ip = str(transport.get_extra_info("peername")[0])
        refusal = self.gateway.admit_connection(ip)
        if refusal is None:
            self._counted_ip = ip
            log_event("connect", ip=ip)
            return
        log_event("reject", stage="connect", ip=ip, reason="too many connections")
        assert self._handler_coroutine is not None
        self._handler_coroutine.cancel()  # no greeting: the 421 is all this client gets
        transport.write(refusal.encode() + b"\r\n")  # type: ignore[attr-defined]
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if getattr(self, "_counted_ip", None) is not None and self._original_transport is None:
            self.gateway.release_connection(self._counted_ip)  # type: ignore[arg-type]
            self._counted_ip = None
        chain = getattr(self.session, "chain", None) if self.session else None
        super().connection_lost(error)
        if chain is not None:
            asyncio.get_event_loop().run_in_executor(None, chain.close)

    @syntax("XCLIENT attribute=value ...")
    async def smtp_XCLIENT(self, arg: str) -> None:
        if self.session is None or not self.gateway.xclient_allowed(self.session):
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        attributes = dict(part.split("=", 1) for part in arg.split() if "=" in part)
        if "ADDR" in attributes:
            self.session.xclient_addr = attributes["ADDR"].removeprefix("IPV6:")
        # A new client as far as the milters are concerned: start their session again.
        chain = getattr(self.session, "chain", None)
        if chain is not None:
            asyncio.get_event_loop().run_in_executor(None, chain.close)
        self.session.chain, self.session.early_verdict = None, None
        self._set_rset_state()
        self.session.host_name = None
        await self.push(f"220 {self.hostname} ESMTP")
