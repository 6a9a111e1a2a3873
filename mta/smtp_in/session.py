"""SMTP in: one client's session: its state (HELO, TLS, AUTH, the transaction), the command
loop over the command table, and the milter chain opened in the background at connect.
The commands themselves are in mta/smtp_in/commands.py and envelope_commands.py."""
from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine

from milters.core.eventlog import log_event
from milters.core.verdict import Verdict

from mta.chain.async_driver import drive
from mta.chain.client import Steps
from mta.chain.session import ChainSession, connect_macros
from mta.queue.spool import Incoming
from .connection import COMMAND_LINE, ClientConnection
from .gateway_handler import GatewayHandler
from .relay_checks import is_loopback
from .syntax import split_command

# Longer command lines than RFC 5321's 512 octets only where an extension allows them:
# MAIL gains 26 for SIZE (RFC 1870), 500 for AUTH= (RFC 4954 5) and 10 for SMTPUTF8
# (RFC 6531 3.4); AUTH and its responses may take 12288 (RFC 4954 4).
SASL_LINE = 12288
LINE_LIMITS = {b"MAIL ": COMMAND_LINE + 26 + 500 + 10, b"AUTH ": SASL_LINE}


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
                and (self.tls or is_loopback(self.peer_ip)))
