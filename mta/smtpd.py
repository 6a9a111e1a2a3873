"""SMTP in: the gateway's own asyncio SMTP server, the milter chain at each stage, and the
durable queue behind the final 250.

Our own protocol rather than aiosmtpd's: aiosmtpd introspects its classes for every
connection, builds a parser class for every MAIL and RCPT and keeps DATA as one object per
line, which cost 2-4x our time per message and 4x the message in memory (bench/README.md).
Here DATA streams straight into the spool file in blocks (smtp_data.DataStream), and a
command costs one dictionary lookup.

- EHLO: PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, STARTTLS (with a
  certificate), AUTH PLAIN LOGIN (with a users file, over TLS or from loopback), XCLIENT (for
  authorized hosts). Replies to pipelined commands go out together when the input runs dry.
- Relay control: a recipient is accepted from internal networks and authenticated clients,
  or for a relay domain; address tricks (`%`, `!`, source routes, quoted local parts with
  `@`, trailing dots) are refused from everyone else.
- Only CRLF ends a line: a bare LF in a command ends the session (521, as Postfix's
  smtpd_forbid_bare_newline), one in DATA refuses the message (SMTP smuggling).
- Milter verdicts from connect and HELO are given at MAIL FROM, as Postfix does by default.
- The final 250 comes only after the queue has the message on disk; a spool failure is
  452 4.3.1.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from milters.core.eventlog import log_event
from milters.core.policy.matching import (AddressPattern, NetworkPattern, match_address,
                                          network_matches, normalize_domain)
from milters.core.verdict import Action, Verdict

from . import sasl
from .edits_apply import Transit
from .metrics import METRICS
from .milter_chain import ChainSession, connect_macros, mail_macros, rcpt_macros
from .milter_async import begin, drive
from .milter_client import Steps
from .queue import Envelope as QueueEnvelope
from .queue import Incoming, Queue, RecipientState, SpoolError, new_queue_id
from .reads import ReadIntoShared
from .session_runner import INPUT, SessionRunner
from .smtputf8 import REQUESTED as SMTPUTF8_REQUESTED
from .smtp_data import DataStream
from .smtp_syntax import PathArgument, SyntaxProblem, parse_path, split_command
from .trace import protocol_name, received_header
from .users import UserFile

_TRICKS = re.compile(r"[%!]|^@|:.*@|\.$|^\".*@.*\"@")
MAX_COMMAND_LINE = 4096  # bytes; RFC 5321 asks for 512, extensions need more
MAX_BUFFERED = 1 << 20  # stop reading from a client that sends this much ahead of us
MAX_ERRORS = 20  # then 421, as Postfix's smtpd_hard_error_limit
MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH"})
LARGE_MESSAGE = 1 << 20  # bytes; bigger messages are read back for milters in a thread


@dataclass(frozen=True)
class SmtpSettings:
    hostname: str
    internal_networks: tuple[NetworkPattern, ...]
    relay_domains: tuple[str, ...] = ()
    xclient_networks: tuple[NetworkPattern, ...] = ()
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_header_bytes: int = 1024 * 1024
    max_hops: int = 50  # Received: headers that mean a mail loop (Postfix's hopcount_limit)
    idle_timeout: float = 300.0
    max_connections: int = 200
    max_connections_per_ip: int = 20
    tls_context: ssl.SSLContext | None = None  # STARTTLS is offered when set
    # Who exists in the relay domains (SaMMA patterns); empty: every address is accepted.
    valid_recipients: tuple[AddressPattern, ...] = ()
    loopback_only: bool = False  # the re-injection listener: local notices and split copies
    users: UserFile | None = None  # SMTP AUTH is offered when set


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


# Parsed once per address, not three or four times per session (EHLO's offers, relay checks).
_ip = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


def _is_loopback(ip: str) -> bool:
    try:
        return _ip(ip).is_loopback
    except ValueError:
        return False


class GatewayHandler:
    """What all connections of one listener share: settings, queue, milter chain factory
    and the connection counts."""

    def __init__(self, settings: SmtpSettings, queue: Queue,
                 chain_factory: Callable[[], ChainSession] | None = None,
                 on_queued: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.chain_factory = chain_factory
        self.on_queued = on_queued  # told each new queue ID (serve wakes delivery with it)
        self.connections: dict[str, int] = {}  # open connections per client IP
        self.open_connections = 0  # their sum, asked for on every message

    def admit_connection(self, ip: str) -> str | None:
        """Count a new connection; the 421 reply when it is one too many."""
        if self.open_connections >= self.settings.max_connections:
            return f"421 4.7.0 {self.settings.hostname} Error: too many connections"
        if self.connections.get(ip, 0) >= self.settings.max_connections_per_ip:
            return f"421 4.7.0 {self.settings.hostname} Error: too many connections from {ip}"
        self.connections[ip] = self.connections.get(ip, 0) + 1
        self.open_connections += 1
        return None

    def release_connection(self, ip: str) -> None:
        self.open_connections -= 1
        left = self.connections.get(ip, 0) - 1
        if left > 0:
            self.connections[ip] = left
        else:
            self.connections.pop(ip, None)

    def relay_domain(self, address: str) -> bool:
        domain = normalize_domain(address.rpartition("@")[2])
        return any(domain == d or domain.endswith("." + d) for d in self.settings.relay_domains)

    def internal(self, ip: str) -> bool:
        try:
            address = _ip(ip)
        except ValueError:
            return False
        return network_matches(address, self.settings.internal_networks)

    def xclient_allowed(self, peer_ip: str) -> bool:
        try:
            peer = _ip(peer_ip)
        except ValueError:
            return False
        return network_matches(peer, self.settings.xclient_networks)


@dataclass
class Transaction:
    """MAIL FROM to end of DATA."""

    queue_id: str
    sender: str
    params: list[str]
    recipients: list[tuple[str, list[str]]] = field(default_factory=list)
    spool: Incoming | None = None  # opened at MAIL, ahead of DATA (see _mail)


Command = Callable[["SmtpConnection", str], Awaitable[bool]]
COMMANDS: dict[str, Command] = {}


def command(verb: str) -> Callable[[Command], Command]:
    def register(handler: Command) -> Command:
        COMMANDS[verb] = handler
        return handler
    return register


class SmtpConnection(ReadIntoShared):
    """One client connection. The protocol callbacks fill a buffer; one session coroutine
    per connection reads commands from it in order, so pipelined commands are answered in
    order. It runs in a SessionRunner: new input resumes it from the read callback."""

    def __init__(self, gateway: GatewayHandler) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self._out: list[bytes] = []
        self._closed = False
        self._paused = False
        self._counted_ip: str | None = None
        self._last_input = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._session: SessionRunner | None = None
        self.peer_ip = ""
        self.peer_port = 0
        self.client_ip = ""  # the peer, or what an authorized XCLIENT said
        self.helo: str | None = None
        self.esmtp = False
        self.tls = False
        self.auth_user: str | None = None
        self.chain: ChainSession | None = None
        self._chain_opening: asyncio.Future[None] | None = None  # connect, HELO under way
        self._background: deque[Callable[[], Steps[Verdict]]] = deque()
        self.early_verdict: Verdict | None = None
        self._transaction: Transaction | None = None
        self.errors = 0

    @property
    def transaction(self) -> Transaction | None:
        return self._transaction

    @transaction.setter
    def transaction(self, new: Transaction | None) -> None:
        """A transaction that ends before DATA took its spool file leaves nothing behind."""
        old = self._transaction
        if old is not None and old is not new and old.spool is not None:
            old.spool.discard()
            old.spool = None
        self._transaction = new

    # -- asyncio.BufferedProtocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer_ip, self.peer_port = str(peer[0]), int(peer[1])
        self.client_ip = self.peer_ip
        refusal = self.gateway.admit_connection(self.peer_ip)
        if refusal is not None:
            log_event("reject", stage="connect", ip=self.peer_ip, reason="too many connections")
            self.transport.write(refusal.encode() + b"\r\n")
            self.transport.close()
            self._closed = True
            return
        self._counted_ip = self.peer_ip
        self.transport.write(f"220 {self.settings.hostname} ESMTP mailmoat\r\n".encode())
        log_event("connect", ip=self.peer_ip)
        self._timer = self.loop.call_later(self.settings.idle_timeout, self._check_idle)
        self._session = SessionRunner(self.loop, self._serve())
        self._session.start()

    def bytes_received(self, data: memoryview) -> None:
        self.buf += data
        self._last_input = self.loop.time()
        if len(self.buf) > MAX_BUFFERED and not self._paused:
            self._paused = True
            self.transport.pause_reading()
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
        if self._counted_ip is not None:
            self.gateway.release_connection(self._counted_ip)
            self._counted_ip = None

    # -- input and output --------------------------------------------------------------------
    def _wake(self) -> None:
        if self._session is not None:
            self._session.input_changed()

    def _waiting_for_input(self) -> bool:
        return self._session is not None and self._session.waiting_for_input

    def _check_idle(self) -> None:
        idle = self.loop.time() - self._last_input
        if self._closed:
            return
        if self._waiting_for_input() and idle >= self.settings.idle_timeout:
            log_event("timeout", ip=self.client_ip, idle=round(idle))
            self.reply(f"421 4.4.2 {self.settings.hostname} Error: timeout exceeded")
            self._close()
            return
        wait = self.settings.idle_timeout - idle if self._waiting_for_input() else \
            self.settings.idle_timeout
        self._timer = self.loop.call_later(max(wait, 0.1), self._check_idle)

    async def _more(self) -> bool:
        """Wait for input; False when the client is gone. Pending replies go out first."""
        if self._closed:
            return False
        self.flush()
        if self._paused and len(self.buf) < MAX_BUFFERED // 4:
            self._paused = False
            self.transport.resume_reading()
        await INPUT  # the session runner goes on when input_changed() says so
        return not self._closed or bool(self.buf)

    async def read_line(self) -> bytes | None:
        """The next command line without its CRLF; None when the session is over."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                if end == 0 or self.buf[end - 1] != 13:
                    self.reply("521 5.5.2 Error: bare <LF> received; use CRLF line ends")
                    log_event("reject", stage="command", ip=self.client_ip, reason="bare LF")
                    return None
                line = bytes(self.buf[:end - 1])
                del self.buf[:end + 1]
                if len(line) > MAX_COMMAND_LINE:
                    self.reply("500 5.5.2 Error: command line too long")
                    continue
                return line
            if len(self.buf) > MAX_COMMAND_LINE:
                self.reply("500 5.5.2 Error: command line too long")
                self.buf.clear()
            if not await self._more():
                return None

    def reply(self, line: str) -> None:
        self._out.append(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def flush(self) -> None:
        if self._out and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _close(self) -> None:
        self.flush()
        self._closed = True
        self.transport.close()

    async def blocking(self, call: Callable[[], Any]) -> Any:
        """Run slow blocking work (fsync under load, big reads, scrypt) off the event loop."""
        return await self.loop.run_in_executor(None, call)

    # -- the session -------------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            self.start_chain()  # after the greeting: the milters need not delay it
            while True:
                line = await self.read_line()
                if line is None:
                    break
                verb, arg = split_command(line)
                handler = COMMANDS.get(verb)
                if handler is None:
                    keep = self.error("502 5.5.2 Error: command not recognized")
                else:
                    keep = await handler(self, arg)
                if not keep:
                    break
        except Exception as exc:  # one broken session must never take the server down
            log_event("smtpd_error", level=logging.ERROR, ip=self.client_ip,
                      error=f"{type(exc).__name__}: {exc}")
            logging.getLogger("mailmoat").debug("traceback", exc_info=True)
            self.reply("421 4.3.0 Error: internal problem, try again later")
        finally:
            self.transaction = None
            self._close()
            self.close_chain()

    def error(self, reply: str) -> bool:
        """Answer a client error; after too many, end the session (False)."""
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.reply(f"421 4.7.0 {self.settings.hostname} Error: too many errors")
            return False
        self.reply(reply)
        return True

    def start_chain(self) -> None:
        """Open the milter session now, in the background, as Postfix does at connect: a
        new connection's set-up (socket, option negotiation) overlaps the client's greeting
        and EHLO instead of delaying MAIL FROM. A connect step the milter does not answer
        goes out with the next packet that needs an answer, or with QUIT: a client that
        never sends MAIL is still seen by the milters (ratelimit counts those)."""
        if self.gateway.chain_factory is None:
            return
        chain = self.chain = self.gateway.chain_factory()
        self._background = deque()  # this chain's own: an ended one may still be finishing
        client = self.client_ip
        family = socket.AF_INET6 if ":" in client else socket.AF_INET
        self.after_chain_opened(lambda: chain.g_connect(
            f"[{client}]", client, self.peer_port, family,
            connect_macros(self.settings.hostname, client)))

    def after_chain_opened(self, stage: Callable[[], Steps[Verdict]]) -> None:
        """Run a milter stage once those already under way are done, without holding up
        the SMTP reply (connect and HELO: their verdicts are given at MAIL FROM, as Postfix
        does). chain_ready() waits for them all."""
        if self.chain is None:
            return
        self._background.append(stage)
        if self._chain_opening is None or self._chain_opening.done():
            self._chain_opening = drive(self._background_stages(self.chain, self._background))

    def _background_stages(self, chain: ChainSession,
                           stages: deque[Callable[[], Steps[Verdict]]]) -> Steps[None]:
        """The queued stages one after the other, in one run; the first refusal is kept."""
        while stages:
            stage = stages.popleft()
            if self.early_verdict is not None:
                continue  # refused already: the milters need not hear more
            verdict = yield from stage()
            if verdict.ends_transaction and self.chain is chain:
                self.early_verdict = verdict

    async def chain_ready(self) -> ChainSession | None:
        """The milter session, once its connect step is done (None without milters)."""
        opening = self._chain_opening
        if opening is not None:
            await opening
            self._chain_opening = None
        return self.chain

    def close_chain(self) -> None:
        """End the milters' session (never blocks: one small packet and a close). If their
        set-up is still under way, as for a client that quits right after EHLO, it is let
        finish first, within its timeouts: the milters still see the connection and HELO."""
        chain, opening = self.chain, self._chain_opening
        self.chain, self._chain_opening = None, None
        if chain is None:
            return
        if opening is not None and not opening.done():
            opening.add_done_callback(lambda _: chain.close())
        else:
            chain.close()

    def reset_session(self) -> None:
        """A new client as far as SMTP and the milters are concerned (STARTTLS, XCLIENT)."""
        self.helo, self.esmtp, self.transaction, self.early_verdict = None, False, None, None
        self.close_chain()
        self.start_chain()

    def may_authenticate(self) -> bool:
        return (self.settings.users is not None and not self.settings.loopback_only
                and (self.tls or _is_loopback(self.peer_ip)))


# -- commands -----------------------------------------------------------------------------------
def _greet(conn: SmtpConnection, arg: str, esmtp: bool) -> None:
    conn.transaction = None
    conn.helo, conn.esmtp = arg, esmtp


def _milter_helo(conn: SmtpConnection, name: str) -> None:
    """HELO to the milters after our reply went out: their verdict, like connect's, is
    given at MAIL FROM, so the client need not wait for them."""
    chain = conn.chain
    if chain is not None:
        conn.flush()
        conn.after_chain_opened(lambda: chain.g_helo(name))


@command("EHLO")
async def _ehlo(conn: SmtpConnection, arg: str) -> bool:
    if not arg:
        return conn.error("501 5.5.4 Syntax: EHLO hostname")
    _greet(conn, arg, esmtp=True)
    settings = conn.settings
    lines = [settings.hostname, "PIPELINING", f"SIZE {settings.max_message_size}"]
    if settings.tls_context is not None and not conn.tls:
        lines.append("STARTTLS")
    if conn.may_authenticate():
        lines.append("AUTH " + " ".join(sasl.MECHANISMS))
    if conn.gateway.xclient_allowed(conn.peer_ip):
        lines.append("XCLIENT ADDR NAME HELO")
    lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
    for line in lines[:-1]:
        conn.reply(f"250-{line}")
    conn.reply(f"250 {lines[-1]}")
    _milter_helo(conn, arg)
    return True


@command("HELO")
async def _helo(conn: SmtpConnection, arg: str) -> bool:
    if not arg:
        return conn.error("501 5.5.4 Syntax: HELO hostname")
    _greet(conn, arg, esmtp=False)
    conn.reply(f"250 {conn.settings.hostname}")
    _milter_helo(conn, arg)
    return True


@command("RSET")
async def _rset(conn: SmtpConnection, arg: str) -> bool:
    if conn.transaction is not None and conn.chain is not None:
        await begin(conn.chain.g_abort())
    conn.transaction = None
    conn.reply("250 2.0.0 Ok")
    return True


def _fixed_reply(reply: str, keep_session: bool = True) -> Command:
    """A command that always gets the same answer."""
    async def answer(conn: SmtpConnection, arg: str) -> bool:
        conn.reply(reply)
        return keep_session
    return answer


COMMANDS["QUIT"] = _fixed_reply("221 2.0.0 Bye", keep_session=False)
COMMANDS["VRFY"] = _fixed_reply(
    "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")
COMMANDS["HELP"] = _fixed_reply("214 2.0.0 See RFC 5321")
COMMANDS["NOOP"] = _fixed_reply("250 2.0.0 Ok")


@command("STARTTLS")
async def _starttls(conn: SmtpConnection, arg: str) -> bool:
    context = conn.settings.tls_context
    if context is None:
        return conn.error("502 5.5.1 Error: command not implemented")
    if conn.tls:
        return conn.error("554 5.5.1 Error: TLS already active")
    if arg:
        return conn.error("501 5.5.4 Syntax: STARTTLS")
    conn.reply("220 2.0.0 Ready to start TLS")
    conn.flush()
    # Commands pipelined after STARTTLS were sent in the clear: never act on them
    # (CVE-2011-0411, the STARTTLS command injection).
    conn.buf.clear()
    try:
        conn.transport = await conn.loop.start_tls(  # type: ignore[assignment]
            conn.transport, conn, context, server_side=True, ssl_handshake_timeout=30)
    except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
        log_event("tls_failed", ip=conn.client_ip, error=str(exc))
        return False
    conn.tls = True
    conn.auth_user = None  # RFC 3207 4.2: forget what was learnt before TLS
    conn.reset_session()
    return True


@command("AUTH")
async def _auth(conn: SmtpConnection, arg: str) -> bool:
    users = conn.settings.users
    if users is None or conn.settings.loopback_only:
        return conn.error("502 5.5.1 Error: authentication not enabled")
    if not conn.may_authenticate():
        return conn.error(sasl.AUTH_NEEDS_TLS)
    if conn.helo is None:
        return conn.error("503 5.5.1 Error: send HELO/EHLO first")
    if conn.auth_user is not None:
        return conn.error(sasl.AUTH_ALREADY)
    if conn.transaction is not None:
        return conn.error("503 5.5.1 Error: MAIL transaction in progress")
    mechanism, _, initial = arg.partition(" ")
    mechanism, initial = mechanism.upper(), initial.strip()
    if mechanism not in sasl.MECHANISMS:
        return conn.error(sasl.AUTH_UNKNOWN_MECH)
    try:
        first = await _sasl_response(conn, initial, "334 " if mechanism == "PLAIN"
                                     else sasl.LOGIN_USER_PROMPT)
        if first is None:
            return False
        if mechanism == "PLAIN":
            user, password = sasl.decode_plain(first)
        else:
            user = sasl.decode_login_step(first)
            second = await _sasl_response(conn, "", sasl.LOGIN_PASSWORD_PROMPT)
            if second is None:
                return False
            password = sasl.decode_login_step(second)
    except sasl.SaslError as problem:
        log_event("auth", level=logging.WARNING, ip=conn.client_ip, mechanism=mechanism,
                  result="refused", reason=problem.reason)
        return conn.error(problem.reply)
    # scrypt takes tens of milliseconds: off the event loop.
    if await conn.blocking(lambda: users.verify(user, password)):
        conn.auth_user = user
        log_event("auth", ip=conn.client_ip, user=user, mechanism=mechanism, result="ok")
        conn.reply(sasl.AUTH_OK)
        return True
    log_event("auth", level=logging.WARNING, ip=conn.client_ip, user=user,
              mechanism=mechanism, result="failed")
    return conn.error(sasl.AUTH_FAILED)


async def _sasl_response(conn: SmtpConnection, initial: str, prompt: str) -> str | None:
    """The client's response: the initial one given with AUTH, or asked for with `prompt`.
    None when the client went away; `*` (RFC 4954: cancel) raises."""
    answer: str | None = initial
    if not answer:
        conn.reply(prompt)
        line = await conn.read_line()
        answer = None if line is None else line.decode("ascii", "replace").strip()
    if answer is not None and sasl.is_cancel(answer):
        raise sasl.SaslError("cancelled by the client", sasl.AUTH_CANCELLED)
    return answer


@command("XCLIENT")
async def _xclient(conn: SmtpConnection, arg: str) -> bool:
    if not conn.gateway.xclient_allowed(conn.peer_ip):
        return conn.error("550 5.7.0 Error: insufficient authorization")
    attributes = dict(part.split("=", 1) for part in arg.split() if "=" in part)
    if "ADDR" in attributes:
        conn.client_ip = attributes["ADDR"].removeprefix("IPV6:")
    conn.auth_user = None  # a new client as far as we are concerned: not authenticated
    conn.reset_session()
    if "HELO" in attributes:
        conn.helo = attributes["HELO"]
    conn.reply(f"220 {conn.settings.hostname} ESMTP mailmoat")
    return True


@command("MAIL")
async def _mail(conn: SmtpConnection, arg: str) -> bool:
    settings = conn.settings
    if conn.helo is None:
        return conn.error("503 5.5.1 Error: send HELO/EHLO first")
    if conn.transaction is not None:
        return conn.error("503 5.5.1 Error: nested MAIL command")
    if settings.loopback_only and not _is_loopback(conn.peer_ip):
        return conn.error("554 5.7.1 Re-injection is for local clients only")
    try:
        path = parse_path(arg, "FROM")
    except SyntaxProblem as problem:
        return conn.error(problem.reply)
    problem = _mail_params_problem(conn, path)
    if problem:
        return conn.error(problem)
    if conn.early_verdict is not None:
        conn.reply(_reply(conn.early_verdict))
        return True
    # The queue ID exists from MAIL FROM on, so milters and our logs name the same ID.
    queue_id = new_queue_id()
    chain = await conn.chain_ready()
    if conn.early_verdict is not None:
        conn.reply(_reply(conn.early_verdict))
        return True
    spool = None
    if chain is not None:
        stage = begin(chain.g_mail(path.address, path.raw_params,
                                   mail_macros(queue_id, path.address, conn.auth_user)))
        # While the milters work on MAIL, create the spool file (an inode and a directory
        # entry: the slow part of starting DATA), so that DATA does not wait for it.
        spool = _open_spool(conn, queue_id)
        try:
            verdict = await stage
        except BaseException:  # the session went away meanwhile
            if spool is not None:
                spool.discard()
            raise
        if verdict.ends_transaction:
            if spool is not None:
                spool.discard()
            conn.reply(_reply(verdict))
            return True
    conn.reply("250 2.1.0 Ok")
    if spool is None:
        # No milter to wait for: the reply goes out first, and the file is made while the
        # client answers it with RCPT.
        conn.flush()
        spool = _open_spool(conn, queue_id)
    conn.transaction = Transaction(queue_id, path.address, path.raw_params, spool=spool)
    return True


def _open_spool(conn: SmtpConnection, queue_id: str) -> Incoming | None:
    """The message's spool file, opened ahead of DATA; None if the spool refuses now
    (DATA tries again and answers 452 if it still cannot)."""
    try:
        return conn.gateway.queue.receive(queue_id)
    except OSError:
        return None


def _mail_params_problem(conn: SmtpConnection, path: PathArgument) -> str | None:
    unknown = [name for name in path.params if name not in MAIL_PARAMS]
    if unknown:
        return f"555 5.5.4 Unsupported option: {unknown[0]}"
    size = path.params.get("SIZE")
    if size is not None:
        if not (size.isascii() and size.isdigit()):
            return "501 5.5.4 Bad SIZE parameter"
        if int(size) > conn.settings.max_message_size:
            return "552 5.3.4 Message size exceeds fixed limit"
    body = (path.params.get("BODY") or "7BIT").upper()
    if body not in ("7BIT", "8BITMIME"):
        return "501 5.5.4 Bad BODY parameter"
    if not path.address.isascii() and "SMTPUTF8" not in path.params:
        return "553 5.6.7 Must declare SMTPUTF8 to send Unicode addresses"
    return None


@command("RCPT")
async def _rcpt(conn: SmtpConnection, arg: str) -> bool:
    gateway, transaction = conn.gateway, conn.transaction
    if transaction is None:
        return conn.error("503 5.5.1 Error: need MAIL command")
    try:
        path = parse_path(arg, "TO")
    except SyntaxProblem as problem:
        return conn.error(problem.reply)
    if path.params:
        return conn.error(f"555 5.5.4 Unsupported option: {next(iter(path.params))}")
    address = path.address
    trusted = conn.auth_user is not None or gateway.internal(conn.client_ip)
    if not trusted:
        problem = recipient_problem(address)
        if problem:
            return conn.error(problem)
        if not gateway.relay_domain(address):
            METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
            log_event("reject", stage="rcpt", ip=conn.client_ip, rcpt=address,
                      reason="relay access denied")
            return conn.error(f"554 5.7.1 <{address}>: Relay access denied")
    if (conn.settings.valid_recipients and gateway.relay_domain(address)
            and not match_address(address, conn.settings.valid_recipients).matched):
        METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
        log_event("reject", stage="rcpt", ip=conn.client_ip, rcpt=address,
                  reason="unknown recipient")
        return conn.error(f"550 5.1.1 <{address}>: Recipient address rejected: User unknown")
    if len(transaction.recipients) >= conn.settings.max_recipients:
        conn.reply("452 4.5.3 Too many recipients")
        return True
    if conn.chain is not None:
        verdict = await begin(conn.chain.g_rcpt(
            address, path.raw_params, rcpt_macros(transaction.queue_id, address)))
        if verdict.ends_transaction:
            conn.reply(_reply(verdict))
            return True
    transaction.recipients.append((address, path.raw_params))
    conn.reply("250 2.1.5 Ok")
    return True


@command("DATA")
async def _data(conn: SmtpConnection, arg: str) -> bool:
    transaction = conn.transaction
    if transaction is None:
        return conn.error("503 5.5.1 Error: need MAIL command")
    if not transaction.recipients:
        return conn.error("554 5.5.1 Error: no valid recipients")
    if arg:
        return conn.error("501 5.5.4 Syntax: DATA")
    incoming, transaction.spool = transaction.spool, None
    if incoming is None:
        try:
            incoming = conn.gateway.queue.receive(transaction.queue_id)
        except OSError as exc:
            log_event("spool_error", queue_id=transaction.queue_id, ip=conn.client_ip,
                      error=str(exc))
            conn.reply("452 4.3.1 Insufficient system storage")
            return True
    try:
        incoming.write(received_header(
            helo=conn.helo, client_ip=conn.client_ip, hostname=conn.settings.hostname,
            queue_id=transaction.queue_id,
            protocol=protocol_name(conn.esmtp, conn.tls, conn.auth_user is not None),
            recipients=[address for address, _ in transaction.recipients]))
    except OSError as exc:
        incoming.discard()
        log_event("spool_error", queue_id=transaction.queue_id, ip=conn.client_ip,
                  error=str(exc))
        conn.reply("452 4.3.1 Insufficient system storage")
        return True
    conn.reply("354 End data with <CR><LF>.<CR><LF>")
    stream = DataStream(incoming.write, max_size=conn.settings.max_message_size,
                        max_header_bytes=conn.settings.max_header_bytes)
    while not stream.feed(conn.buf):
        if not await conn._more():
            incoming.discard()
            return False
    conn.transaction = None
    try:
        answer = await _finish(conn, transaction, incoming, stream)
    except BaseException:
        incoming.discard()
        raise
    if answer is not None:
        conn.reply(answer)
    return True


async def _finish(conn: SmtpConnection, transaction: Transaction, incoming: Incoming,
                  stream: DataStream) -> str | None:
    """What to answer at the end of DATA; None when the message is queued and its 250
    already sent."""
    client = conn.client_ip
    METRICS.count("mailmoat_messages_received_total")
    refusal = None
    if stream.bare_line_end:
        refusal = ("bare LF or CR",
                   "554 5.6.0 Message refused: bare LF or CR in the data; send CRLF line ends")
    elif stream.too_big:
        refusal = ("too big", "552 5.3.4 Message size exceeds fixed maximum message size")
    elif stream.received_headers >= conn.settings.max_hops:
        refusal = ("mail loop", "554 5.4.0 Error: too many hops (mail loop?)")
    elif stream.header_too_big:
        refusal = ("header too big", "552 5.3.4 Message header too large")
    elif stream.sink_error is not None:
        incoming.discard()
        log_event("spool_error", queue_id=transaction.queue_id, ip=client,
                  error=str(stream.sink_error))
        return "452 4.3.1 Insufficient system storage"
    if refusal is not None:
        incoming.discard()
        METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
        log_event("reject", stage="data", queue_id=transaction.queue_id, ip=client,
                  reason=refusal[0])
        return refusal[1]
    recipients = [(address, " ".join(params) or None)
                  for address, params in transaction.recipients]
    replacement: bytes | None = None
    sender, quarantine = transaction.sender, None
    chain = conn.chain
    if chain is not None:
        # A large file is read in a thread so other clients are not held up meanwhile.
        received = (await conn.blocking(incoming.read) if incoming.size > LARGE_MESSAGE
                    else incoming.read())
        verdict, transit = await begin(chain.g_message(Transit(received, sender, recipients),
                                                           {"i": transaction.queue_id}))
        if verdict.action is Action.DISCARD:
            incoming.discard()
            log_event("discarded", queue_id=transaction.queue_id, ip=client, sender=sender)
            return "250 2.0.0 Ok: discarded"
        if verdict.ends_transaction and verdict.action is not Action.ACCEPT:
            incoming.discard()
            return _reply(verdict)
        if transit.raw is not received:  # a milter changed the content
            replacement = transit.raw
        sender, recipients, quarantine = transit.sender, transit.recipients, transit.quarantine
    if not recipients:
        incoming.discard()
        return "250 2.0.0 Ok: no recipients left"
    envelope = QueueEnvelope(
        transaction.queue_id, sender,
        [RecipientState(address, params) for address, params in recipients],
        received_at=time.time(), client_ip=client, helo=conn.helo, hold_reason=quarantine)
    if conn.auth_user:
        envelope.extra["auth_user"] = conn.auth_user
    if any(param.upper() == "SMTPUTF8" for param in transaction.params):
        envelope.extra[SMTPUTF8_REQUESTED] = "yes"  # delivery passes it on (mta/smtputf8.py)
    try:
        # The fsyncs: inline when this is the only client (an executor hop costs more than
        # the fsync), in a thread when others are waiting, so their work goes on meanwhile.
        if conn.gateway.open_connections > 1:
            queue_id = await conn.blocking(lambda: incoming.commit(envelope, replacement))
        else:
            queue_id = incoming.commit(envelope, replacement)
    except SpoolError as exc:
        log_event("spool_error", queue_id=transaction.queue_id, ip=client, error=str(exc))
        return "452 4.3.1 Insufficient system storage"
    # The client waits for this reply and nothing else: it goes out before the rest.
    conn.reply(f"250 2.0.0 Ok: queued as {queue_id}")
    conn.flush()
    if conn.gateway.on_queued is not None:
        conn.gateway.on_queued(queue_id)
    METRICS.count("mailmoat_messages_queued_total")
    log_event("queued", queue_id=queue_id, ip=client, sender=sender, nrcpt=len(recipients),
              size=envelope.size, held=quarantine)
    return None
