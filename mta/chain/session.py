"""Run the configured milters in order for one SMTP session, as Postfix does.

Every stage goes to each milter in turn; the first reject, tempfail or discard ends the
stage for all; a milter that accepts is left out for the rest of the transaction. At end of
data each milter gets the message as the earlier ones left it (their edits applied). A
milter that cannot be reached, breaks the protocol or times out gets its `on_failure`:
tempfail (the default), reject, or accept (go on without it). A tempfail or reject holds
for the rest of the SMTP session, as Postfix's milter default action does: every later
stage that reaches that milter's place in the chain gets the same reply, so a session never
goes on without a milter it started with. Everything is logged.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Callable

from milters.core.edits import ChangeHeader, Edit, ReplaceBody
from milters.core.errors import MilterProtocolError
from milters.core.eventlog import log_event
from milters.core.milter_protocol import ProtocolFlag
from milters.core.review import parse_review_reason
from milters.core.verdict import Action, SmtpReply, Verdict

from mta.metrics import METRICS
from .client import (DEFAULT_TEMPFAIL, BlockingEnvelopeStages, MilterClient, MilterEndpoint,
                     Steps, run_sync)
from .edits_apply import Transit, apply_edits
from .pool import MilterPool
from .wire_header import wire_header

ON_FAILURE = ("tempfail", "reject", "accept")
_HDR_LEADSPC = int(ProtocolFlag.HDR_LEADSPC)
_NO_CONTENT = int(ProtocolFlag.NOHDRS | ProtocolFlag.NOBODY)
_NO_BODY = int(ProtocolFlag.NOBODY)
_NO_HEADERS = int(ProtocolFlag.NOHDRS)
FAILURE_REJECT = SmtpReply(550, "5.7.1", "Message content rejected")


def connect_macros(hostname: str, client: str) -> dict[str, str]:
    """The connect-stage macros Postfix sends by default (milter_connect_macros)."""
    return {"j": hostname, "{daemon_name}": "mailmoat", "{client_addr}": client,
            "{client_name}": f"[{client}]", "_": f"[{client}] [{client}]"}


def mail_macros(queue_id: str, sender: str, auth_user: str | None = None) -> dict[str, str]:
    macros = {"i": queue_id, "{mail_addr}": sender}
    if auth_user:
        macros["{auth_authen}"] = auth_user
    return macros


def rcpt_macros(queue_id: str, recipient: str) -> dict[str, str]:
    return {"i": queue_id, "{rcpt_addr}": recipient, "{rcpt_mailer}": "smtp"}


_LATENCY: dict[tuple[str, str], Callable[[float], None]] = {}


def _latency(milter: str, stage: str) -> Callable[[float], None]:
    """The latency histogram of one milter's stage (resolved once per pair)."""
    observe = _LATENCY.get((milter, stage))
    if observe is None:
        observe = _LATENCY[(milter, stage)] = METRICS.observer(
            "mailmoat_milter_latency_seconds", milter=milter, stage=stage)
    return observe


@dataclass(frozen=True)
class ChainMember:
    endpoint: MilterEndpoint
    on_failure: str = "tempfail"
    reuse_connection: bool = False  # QUIT_NC between SMTP sessions (pool.py)


@dataclass
class MilterResult:
    """What one milter said during a session, for logs and `mailmoat scan --json`."""

    name: str
    verdict: str = "continue"
    reply: str | None = None
    stage: str | None = None
    actions: list[Edit] = field(default_factory=list)
    error: str | None = None


class _Member:
    def __init__(self, spec: ChainMember) -> None:
        self.spec = spec
        self.client = MilterClient(spec.endpoint)
        self.result = MilterResult(spec.endpoint.name)
        self.open = False
        self.out_for_session = False  # failed with on_failure accept, or accepted at connect
        # Failed with on_failure tempfail or reject: the reply every later stage gets.
        self.failure: Verdict | None = None
        self.out_for_message = False  # accepted this transaction
        # Its last exchange was end of message answered with continue: the one state in
        # which libmilter takes QUIT_NC (in any other it ignores it, and the next CONNECT).
        self.at_end_of_message = False

    @property
    def active(self) -> bool:
        return not (self.out_for_session or self.out_for_message)


class ChainSession(BlockingEnvelopeStages):
    """The milter chain for one SMTP session. The g_* methods are protocol steps for a
    driver (async_driver.drive in serve); the plain methods run them blocking."""

    def __init__(self, members: list[ChainMember], queue_id: Callable[[], str | None] = lambda: None,
                 pool: MilterPool | None = None) -> None:
        self.members = [_Member(spec) for spec in members]
        self._given_queue_id = queue_id
        self._macro_queue_id: str | None = None  # the current message's, from macro i
        self._pool = pool  # idle connections from earlier sessions (serve's event loop only)
        # The milter whose edits held the message for review (its name): the later ones
        # were not given it; they run when the review releases it (mta/review/resume.py).
        self.review_hold_by: str | None = None

    # -- blocking use (scan, tests; connect/helo/mail/rcpt come from the base class) ------
    def message(self, transit: Transit, macros: dict[str, str] | None = None
                ) -> tuple[Verdict, Transit]:
        return run_sync(self.g_message(transit, macros))

    def abort(self) -> None:
        run_sync(self.g_abort())

    # -- stages ----------------------------------------------------------------------------
    def g_connect(self, hostname: str, address: str | None, port: int = 0,
                  family: int = socket.AF_INET, macros: dict[str, str] | None = None
                  ) -> Steps[Verdict]:
        for member in self.members:
            reused = (self._pool.take(member.spec.endpoint)
                      if self._pool is not None and member.spec.reuse_connection else None)
            if reused is not None:
                member.client, member.open = reused, True
                METRICS.count("mailmoat_milter_sessions_total",
                              milter=member.spec.endpoint.name, connection="reused")
                continue
            try:
                yield from member.client.g_open()
                member.open = True
                METRICS.count("mailmoat_milter_sessions_total",
                              milter=member.spec.endpoint.name, connection="new")
            except MilterProtocolError as exc:
                verdict = self._failed(member, "connect", exc)
                if verdict.ends_transaction:
                    return verdict
        return (yield from self._each(
            "connect", lambda c: c.g_connect(hostname, address, port, family, macros),
            whole_session=True))

    def g_helo(self, name: str, macros: dict[str, str] | None = None) -> Steps[Verdict]:
        return (yield from self._each("helo", lambda c: c.g_helo(name, macros),
                                      whole_session=True))

    def g_mail(self, sender: str, params: list[str] = (),  # type: ignore[assignment]
               macros: dict[str, str] | None = None) -> Steps[Verdict]:
        for member in self.members:
            member.out_for_message = member.at_end_of_message = False
        self._macro_queue_id = (macros or {}).get("i")
        return (yield from self._each("mail", lambda c: c.g_mail(sender, params, macros)))

    def g_rcpt(self, recipient: str, params: list[str] = (),  # type: ignore[assignment]
               macros: dict[str, str] | None = None) -> Steps[Verdict]:
        return (yield from self._each("rcpt", lambda c: c.g_rcpt(recipient, params, macros)))

    def g_message(self, transit: Transit, macros: dict[str, str] | None = None
                  ) -> Steps[tuple[Verdict, Transit]]:
        """Headers, body and end of message to each milter in turn, applying its edits
        before the next one sees the message."""
        self._macro_queue_id = (macros or {}).get("i") or self._macro_queue_id
        self.review_hold_by = None
        for position, member in enumerate(self.members):
            if member.failure is not None:
                return self._failed_earlier(member, "eom"), transit
            if not member.active or not member.open:
                continue
            started = time.monotonic()
            try:
                verdict, transit = yield from self._content(member, transit, macros)
            except MilterProtocolError as exc:
                verdict = self._failed(member, "eom", exc)
            _latency(member.spec.endpoint.name, "message")(time.monotonic() - started)
            if verdict.action is Action.ACCEPT:
                member.out_for_message = True
            elif verdict.ends_transaction:
                return verdict, transit
            if parse_review_reason(transit.quarantine) is not None:
                # Held for review: the milters after this one see the message only if it is
                # released (a ZIP and its password notice must not go out before that).
                self.review_hold_by = member.spec.endpoint.name
                yield from self._abort_after(position)
                break
        return Verdict.cont(), transit

    def _abort_after(self, position: int) -> Steps[None]:
        """ABORT to the milters after `position` that have this message's envelope."""
        for member in self.members[position + 1:]:
            member.at_end_of_message = False
            if member.open and member.active and member.failure is None:
                try:
                    yield from member.client.g_abort()
                except MilterProtocolError as exc:
                    self._failed(member, "abort", exc)
                member.out_for_message = True

    def g_abort(self) -> Steps[None]:
        for member in self.members:
            member.at_end_of_message = False
            if member.open and member.active:
                try:
                    yield from member.client.g_abort()
                except MilterProtocolError as exc:
                    self._failed(member, "abort", exc)  # its reply goes to the next stage

    def close(self) -> None:
        """End the milters' session: QUIT, or QUIT_NC for a connection the pool keeps."""
        pool = self._pool
        for member in self.members:
            if (pool is not None and member.spec.reuse_connection and member.open
                    and member.at_end_of_message and pool.give_back(member.client)):
                member.open = False
                continue
            member.client.close()

    @property
    def results(self) -> list[MilterResult]:
        return [member.result for member in self.members]

    # -- internals -----------------------------------------------------------------------
    def _content(self, member: _Member, transit: Transit, macros: dict[str, str] | None
                 ) -> Steps[tuple[Verdict, Transit]]:
        """One milter's DATA, headers, body and end of message. The body goes out a chunk
        at a time as it is read from the message's file; edits are written to a new text,
        which the next milter reads (the one it replaced is removed)."""
        client = member.client
        assert client.negotiated is not None
        protocol = client.protocol_bits  # an int: enum.Flag tests cost microseconds each
        leading_space = bool(protocol & _HDR_LEADSPC)
        steps: list[Callable[[], Steps[Verdict]]] = [lambda: client.g_data(macros)]
        body: memoryview | Iterator[bytes] | None = None
        cuts: list[Edit] = []  # headers too long for this milter, cut in the message too
        # A milter that skips headers and body (ours for rate limits) costs no read of the
        # message at all: its text is neither opened nor copied.
        if (protocol & _NO_CONTENT) != _NO_CONTENT:
            fields, body_start = transit.text.head()
            seen: dict[str, int] = {}
            for raw_field in fields:
                name, _, value = raw_field.decode("utf-8", "surrogateescape").partition(":")
                value = value[:-2] if value.endswith("\r\n") else value
                if not leading_space:
                    value = value.lstrip(" \t")
                index = seen[name.lower()] = seen.get(name.lower(), 0) + 1
                if not protocol & _NO_HEADERS:
                    cut = _cut_field(name, value, index, client.max_data)
                    if cut is not None:
                        cuts.append(cut)
                steps.append(lambda n=name, v=value: client.g_header(n, v))
            steps.append(lambda: client.g_end_of_headers(macros))
            if not protocol & _NO_BODY:
                body = transit.text.body(body_start)
                steps.append(lambda: client.g_body(body))  # type: ignore[arg-type]
        else:
            steps.append(lambda: client.g_end_of_headers(macros))
        try:
            for step in steps:
                verdict = yield from step()
                if verdict.ends_transaction:
                    self._note(member, "content", verdict)
                    return verdict, transit
        finally:
            if isinstance(body, Iterator):
                body.close()  # its file, also when the milter skipped the rest
        outcome = yield from client.g_end_of_message(macros, spill_dir=transit.workdir)
        member.result.actions += outcome.edits
        try:
            # The cut headers first: what is delivered (and what later milters see) is what
            # this milter judged, never a longer header it could not read (a forged
            # Authentication-Results hidden past the limit would otherwise go through).
            edited = apply_edits(transit, cuts + outcome.edits, leading_space=leading_space)
        finally:
            for edit in outcome.edits:
                if isinstance(edit, ReplaceBody) and not isinstance(edit.body, bytes):
                    edit.body.close()  # a new body spilled to a file: copied, not needed
        if edited.text is not transit.text and transit.text.path in transit.scratch:
            transit.remove_scratch(keep=edited.text.path)  # the text it replaced
        member.at_end_of_message = outcome.verdict.action is Action.CONTINUE
        self._note(member, "eom", outcome.verdict)
        return outcome.verdict, edited

    def _each(self, stage: str, call: Callable[[MilterClient], Steps[Verdict]],
              whole_session: bool = False) -> Steps[Verdict]:
        for member in self.members:
            if member.failure is not None:
                return self._failed_earlier(member, stage)
            if not member.active or not member.open:
                continue
            started = time.monotonic()
            try:
                verdict = yield from call(member.client)
            except MilterProtocolError as exc:
                verdict = self._failed(member, stage, exc)
            _latency(member.spec.endpoint.name, stage)(time.monotonic() - started)
            self._note(member, stage, verdict)
            if verdict.action is Action.ACCEPT:
                if whole_session:
                    member.out_for_session = True
                else:
                    member.out_for_message = True
            elif verdict.ends_transaction:
                return verdict
        return Verdict.cont()

    def _queue_id(self) -> str | None:
        """For log lines (and so the audit log): the driver's, else macro i of the message."""
        return self._given_queue_id() or self._macro_queue_id

    def _note(self, member: _Member, stage: str, verdict: Verdict) -> None:
        if verdict.action is Action.CONTINUE:
            if stage == "eom":  # each milter's word on the message, for its audit story
                log_event("milter_passed", milter=member.spec.endpoint.name,
                          edits=len(member.result.actions), queue_id=self._queue_id())
            return
        member.result.verdict = verdict.action.value
        member.result.reply = str(verdict.reply) if verdict.reply else None
        if verdict.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD):
            METRICS.count("mailmoat_messages_rejected_total", by=member.spec.endpoint.name)
        member.result.stage = stage
        log_event("milter_verdict", milter=member.spec.endpoint.name, stage=stage,
                  action=verdict.action.value, reply=member.result.reply,
                  queue_id=self._queue_id())

    def _failed(self, member: _Member, stage: str, exc: MilterProtocolError) -> Verdict:
        """The milter broke: close it for the rest of the session and return its on_failure
        reply, which tempfail and reject keep for every later stage (Postfix does the same
        with milter_default_action: a milter in error answers each later event with it)."""
        action = member.spec.on_failure
        member.result.error = str(exc)
        log_event("milter_failed", level=logging.ERROR, milter=member.spec.endpoint.name,
                  stage=stage, error=str(exc), action=action, queue_id=self._queue_id())
        member.client.close()  # never offered to the pool: only an open member is (close())
        member.open = member.at_end_of_message = False
        member.out_for_session = True
        if action == "accept":
            # What the admin chose: the rest of the session goes on without this milter.
            return Verdict.cont(f"milter {member.spec.endpoint.name} failed; on_failure accept")
        if action == "reject":
            member.failure = Verdict.reject(FAILURE_REJECT, reason=str(exc))
        else:
            member.failure = Verdict.tempfail(DEFAULT_TEMPFAIL, reason=str(exc))
        return member.failure

    def _failed_earlier(self, member: _Member, stage: str) -> Verdict:
        """A later stage reached a milter that failed earlier in this session: its
        on_failure reply again, never a pass without it."""
        verdict = member.failure
        assert verdict is not None
        member.result.stage = stage
        METRICS.count("mailmoat_messages_rejected_total", by=member.spec.endpoint.name)
        log_event("milter_failed_earlier", level=logging.WARNING,
                  milter=member.spec.endpoint.name, stage=stage, action=verdict.action.value,
                  reply=str(verdict.reply), queue_id=self._queue_id())
        return verdict


def _cut_field(name: str, value: str, index: int, max_data: int) -> ChangeHeader | None:
    """The edit that cuts a header to what a milter with this packet limit is sent
    (wire_header.wire_header, as Postfix's header_size_limit keeps a header's start);
    None when it fits."""
    if 4 * (len(name) + len(value)) <= max_data - 2:  # fits even at 4 bytes a character:
        return None  # the common case costs no encoding (g_header encodes it once)
    header = wire_header(name, value, max_data)
    if not header.truncated:
        return None
    sent_name, sent_value = header.payload.split(b"\0")[:2]
    if sent_name != name.encode("utf-8", "surrogateescape"):
        return None  # a name past the limit (a long line without a colon): no field to cut
    return ChangeHeader(name, index, sent_value.decode("utf-8", "surrogateescape") or " ")
