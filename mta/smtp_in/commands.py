"""SMTP in: the commands outside a mail transaction: HELO/EHLO (with the offers), RSET,
QUIT and friends, STARTTLS, AUTH and XCLIENT."""
from __future__ import annotations

import asyncio
import logging
import ssl

from milters.core.eventlog import log_event

from mta.chain.async_driver import begin
from . import sasl
from .relay_checks import parsed_ip
from .session import COMMANDS, SASL_LINE, Command, SmtpConnection, command
from .trace import header_hostname


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
            parsed_ip(address)
        except ValueError:
            return conn.error("501 5.5.4 Bad ADDR syntax")
        conn.client_ip = address
    conn.auth_user = None  # a new client as far as we are concerned: not authenticated
    conn.reset_session()
    if "HELO" in attributes:
        conn.helo = header_hostname(attributes["HELO"])
    conn.reply(f"220 {conn.settings.hostname} ESMTP mailmoat")
    return True
