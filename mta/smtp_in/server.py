"""SMTP in: the gateway's own asyncio SMTP server, the milter chain at each stage, and the
durable queue behind the final 250. This module holds the command table and what all
connections share; the bytes, flow control and deadlines are mta/smtp_in/connection.py's,
the DATA path mta/smtp_in/message.py's.

Our own protocol rather than aiosmtpd's: aiosmtpd introspects its classes for every
connection, builds a parser class for every MAIL and RCPT and keeps DATA as one object per
line, which cost 2-4x our time per message and 4x the message in memory (bench/README.md).
Here DATA streams straight into the spool file in blocks (data.DataStream), and a
command costs one dictionary lookup.

- EHLO: PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, STARTTLS (with a
  certificate), AUTH PLAIN LOGIN (with a users file, over TLS or from loopback), XCLIENT (for
  authorized hosts). Replies to pipelined commands go out together when the input runs dry.
- Relay control: a recipient is accepted from internal networks and authenticated clients,
  or for a relay domain (compared as IDNA 2008 A-labels); sender-specified routing (`%`,
  `!`, a second `@`, source routes, quoted local parts hiding them) is relay access denied
  from everyone else. Non-ASCII addresses need SMTPUTF8 on MAIL (553 5.6.7).
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
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine

from milters.core.config import SmtpdLimits
from milters.core.eventlog import log_event
from milters.core.policy.matching import (AddressPattern, NetworkPattern, match_address,
                                          network_matches, normalize_domain)
from milters.core.verdict import Verdict

from mta.chain.async_driver import begin, drive
from mta.chain.client import Steps
from mta.chain.session import ChainSession, connect_macros, mail_macros, rcpt_macros
from mta.metrics import METRICS
from mta.queue.spool import Incoming, Queue, new_queue_id
from . import sasl
from .connection import COMMAND_LINE, ClientConnection
from .message import reply_for as _reply
from .message import receive_message
from .syntax import PathArgument, SyntaxProblem, parse_path, split_command
from .trace import header_hostname
from .users import UserFile

# Longer command lines than RFC 5321's 512 octets only where an extension allows them:
# MAIL gains 26 for SIZE (RFC 1870), 500 for AUTH= (RFC 4954 5) and 10 for SMTPUTF8
# (RFC 6531 3.4); AUTH and its responses may take 12288 (RFC 4954 4).
SASL_LINE = 12288
LINE_LIMITS = {b"MAIL ": COMMAND_LINE + 26 + 500 + 10, b"AUTH ": SASL_LINE}
MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH"})


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
    # Postfix's smtpd_timeout: the idle limit between reads, and the deadline for a whole
    # command line; for DATA the deadline grows by a second per min_data_rate bytes
    # (smtpd_min_data_rate). Under stress (open connections at stress_share of
    # max_connections) stress_timeout applies instead, as Postfix's ${stress?{10}:{300}}s.
    timeout: float = 300.0
    stress_timeout: float = 10.0
    min_data_rate: float = 500.0
    stress_share: float = 0.8
    max_connections: int = 200
    max_connections_per_ip: int = 20
    tls_context: ssl.SSLContext | None = None  # STARTTLS is offered when set
    # Who exists in the relay domains (SaMMA patterns); empty: every address is accepted.
    valid_recipients: tuple[AddressPattern, ...] = ()
    loopback_only: bool = False  # the re-injection listener: local notices and split copies
    users: UserFile | None = None  # SMTP AUTH is offered when set


SMTPUTF8_NEEDED = "553 5.6.7 Must declare SMTPUTF8 to send Unicode addresses"


def smtpd_limits(limits: SmtpdLimits) -> dict[str, float]:
    """The SmtpSettings fields that come from the config's smtpd_* keys."""
    return {"timeout": limits.timeout, "stress_timeout": limits.stress_timeout,
            "min_data_rate": float(limits.min_data_rate), "stress_share": limits.stress_share}


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def recipient_problem(address: str) -> str | None:
    """Why a recipient from a client that may not relay is refused on syntax alone, or
    None: it must be local@domain, the domain without a trailing dot."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or domain.endswith("."):
        return "501 5.1.3 Bad recipient address syntax"
    return None


def sender_routed(address: str) -> bool:
    """Does the address name its own route, beyond its domain? A source route
    (`@a,@b:user@c`), or a local part holding another destination: `user@a@b`,
    `user%b@a` (the percent hack), `b!user@a` (a UUCP bang path), and the same hidden in
    a quoted local part (`"user@b"@a`). Everything before the last '@' is the local
    part: quoted or not, '@', '%' and '!' there are routing to a mail server that honours
    them (Postfix's allow_untrusted_routing = no refuses them all)."""
    if address.startswith("@"):
        return True
    local = address.rpartition("@")[0]
    return "@" in local or "%" in local or "!" in local


def domain_problem(address: str) -> bool:
    """A non-ASCII domain that is no IDNA 2008 name has no A-label: it can be neither
    compared nor routed (RFC 6531 3.2: domains in U-labels must be valid)."""
    domain = address.rpartition("@")[2]
    return not domain.isascii() and not normalize_domain(domain).isascii()


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
        # Compared in one form, IDNA 2008 A-labels, so that a Unicode spelling of an IDN
        # relay domain is that domain and a look-alike is not.
        self.relay_domains = tuple(normalize_domain(d) for d in settings.relay_domains)
        # Postfix is stressed when every smtpd process is busy and clients wait in the
        # queue; we refuse at max_connections instead of queueing, so stress must start
        # before that: at a share of the limit.
        self._stress_at = max(1, int(settings.max_connections * settings.stress_share))

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

    def under_stress(self) -> bool:
        return self.open_connections >= self._stress_at

    def relay_domain(self, address: str) -> bool:
        domain = normalize_domain(address.rpartition("@")[2])
        return any(domain == d or domain.endswith("." + d) for d in self.relay_domains)

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
    smtputf8: bool = False  # MAIL said SMTPUTF8: non-ASCII addresses are allowed
    recipients: list[tuple[str, list[str]]] = field(default_factory=list)
    spool: Incoming | None = None  # opened at MAIL, ahead of DATA (see _mail)


Command = Callable[["SmtpConnection", str], Awaitable[bool]]
COMMANDS: dict[str, Command] = {}


def command(verb: str) -> Callable[[Command], Command]:
    def register(handler: Command) -> Command:
        COMMANDS[verb] = handler
        return handler
    return register


class SmtpConnection(ClientConnection):
    """One client connection. The protocol callbacks fill a buffer; one session coroutine
    per connection reads commands from it in order, so pipelined commands are answered in
    order. It runs in a SessionRunner: new input resumes it from the read callback."""

    def __init__(self, gateway: GatewayHandler) -> None:
        super().__init__(gateway.settings.min_data_rate)
        self.gateway = gateway
        self.settings = gateway.settings
        self.hostname = self.settings.hostname
        self.helo: str | None = None
        self.esmtp = False
        self.tls = False
        self.auth_user: str | None = None
        self.chain: ChainSession | None = None
        self._chain_opening: asyncio.Future[None] | None = None  # connect, HELO under way
        self._background: deque[Callable[[], Steps[Verdict]]] = deque()
        self.early_verdict: Verdict | None = None
        self._transaction: Transaction | None = None
        self._counted_ip = ""

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

    # -- ClientConnection --------------------------------------------------------------------
    def admit(self) -> str | None:
        refusal = self.gateway.admit_connection(self.peer_ip)
        if refusal is not None:
            log_event("reject", stage="connect", ip=self.peer_ip, reason="too many connections")
            return refusal
        self._counted_ip = self.peer_ip
        log_event("connect", ip=self.peer_ip)
        return None

    def greeting(self) -> str:
        return f"220 {self.settings.hostname} ESMTP mailmoat"

    def session(self) -> Coroutine[Any, Any, None]:
        return self._serve()

    def released(self) -> None:
        self.gateway.release_connection(self._counted_ip)

    def timeout_now(self) -> tuple[float, bool]:
        if self.gateway.under_stress():
            return self.settings.stress_timeout, True
        return self.settings.timeout, False

    def recheck_interval(self) -> float:
        return self.settings.stress_timeout

    def line_limit(self) -> int:
        return LINE_LIMITS.get(bytes(self.buf[:5]).upper(), COMMAND_LINE)

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
            self.close()
            self.close_chain()

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
def _greet(conn: SmtpConnection, arg: str, esmtp: bool) -> str:
    """Remember the client's name, made safe once for every header and milter that will
    carry it (Received, the milters' HELO, Authentication-Results), and return it."""
    conn.transaction = None
    conn.helo, conn.esmtp = header_hostname(arg), esmtp
    return conn.helo


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
    name = _greet(conn, arg, esmtp=True)
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
    _milter_helo(conn, name)
    return True


@command("HELO")
async def _helo(conn: SmtpConnection, arg: str) -> bool:
    if not arg:
        return conn.error("501 5.5.4 Syntax: HELO hostname")
    name = _greet(conn, arg, esmtp=False)
    conn.reply(f"250 {conn.settings.hostname}")
    _milter_helo(conn, name)
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
    conn.set_write_limits()
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
        line = await conn.read_line(SASL_LINE)
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
        # Only an address: it goes into our Received header and the milters' macros.
        address = attributes["ADDR"].removeprefix("IPV6:")
        try:
            _ip(address)
        except ValueError:
            return conn.error("501 5.5.4 Bad ADDR syntax")
        conn.client_ip = address
    conn.auth_user = None  # a new client as far as we are concerned: not authenticated
    conn.reset_session()
    if "HELO" in attributes:
        conn.helo = header_hostname(attributes["HELO"])
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
    conn.transaction = Transaction(queue_id, path.address, path.raw_params,
                                   smtputf8="SMTPUTF8" in path.params, spool=spool)
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
        return SMTPUTF8_NEEDED
    if domain_problem(path.address):
        return "553 5.1.7 Bad sender address syntax (not an IDNA 2008 domain)"
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
    if not address.isascii() and not transaction.smtputf8:
        return conn.error(SMTPUTF8_NEEDED)  # RFC 6531 3.4: only in an SMTPUTF8 transaction
    if domain_problem(address):
        return conn.error("553 5.1.3 Bad recipient address syntax (not an IDNA 2008 domain)")
    trusted = conn.auth_user is not None or gateway.internal(conn.client_ip)
    if not trusted:
        problem = recipient_problem(address)
        if problem:
            return conn.error(problem)
        # Sender-specified routing from a client that may not relay is a relay attempt
        # through our relay domain's server, and answered as Postfix answers it with
        # allow_untrusted_routing = no: 554 5.7.1 Relay access denied (permanent: no retry
        # will ever change it; 5.7.1, delivery not authorized). Trusted clients may still
        # route, as in Postfix, where the setting concerns untrusted clients only.
        routed = sender_routed(address)
        if routed or not gateway.relay_domain(address):
            METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
            log_event("reject", stage="rcpt", ip=conn.client_ip, rcpt=address,
                      reason="sender-specified routing" if routed else "relay access denied")
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
    return await receive_message(conn, transaction)
