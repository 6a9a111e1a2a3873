"""Signing one message: plan at the end of the header section (who signs, with which keys),
hash the body as it streams past, add the DKIM-Signature fields at the end of message.
Plain classes over header lists and bytes: testable without sockets."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Callable

from milters.core.edits import AddHeader, EomResult
from milters.core.eventlog import log_event
from milters.core.message import Envelope, Message
from milters.core.policy.document import Policy
from milters.core.verdict import Verdict

from . import arc_seal
from .decide import Plan, plan_for
from .dkim_sign import BodyHasher, dkim_signature
from .settings import MILTER, SignSettings

_LINE_END = re.compile(rb"\r?\n")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def header_fields(headers: list[tuple[str, str]], leading_space: bool) -> list[tuple[bytes, bytes]]:
    """Header fields as the next hop reads them: the value after the colon, the space the
    MTA writes after it, folds as CRLF."""
    fields = []
    for name, value in headers:
        raw = value.encode("utf-8", "surrogateescape")
        if not leading_space:
            raw = b" " + raw  # what Postfix and our MTA write: "Name: value"
        fields.append((name.encode("utf-8", "surrogateescape"), _LINE_END.sub(b"\r\n", raw)))
    return fields


@dataclass
class Pending:
    """One message between its header section and its end."""

    policy: Policy
    plan: Plan
    fields: list[tuple[bytes, bytes]]
    body: BodyHasher | None  # None: nothing to sign or seal, the body is not hashed
    leading_space: bool  # the MTA writes added values as given (SMFIP_HDR_LEADSPC)
    arc: str = ""  # why this inbound message gets an ARC set ("" = it does not)


class Signer:
    def __init__(self, authserv_id: str = "localhost",
                 clock: Callable[[], float] = time.time) -> None:
        self.authserv_id = authserv_id  # the gateway's hostname: the auth milter's A-R id
        self.clock = clock

    def start(self, policy: Policy, env: Envelope, headers: list[tuple[str, str]],
              leading_space: bool) -> Pending:
        froms = [value for name, value in headers if name.strip().lower() == "from"]
        subject = next((v for n, v in headers if n.strip().lower() == "subject"), "")
        plan = plan_for(policy, env, froms, subject)
        settings: SignSettings = policy.sections[MILTER]
        fields = header_fields(headers, leading_space)
        body, arc = None, ""
        if plan.keys:
            body = BodyHasher(settings.canonicalization.split("/")[1])
        elif plan.why == "(inbound)" and settings.arc.key is not None:
            # Sealed as it leaves: the fields here are after every earlier milter's edits.
            arc = "seal: all" if settings.arc.seal == "all" else arc_seal.changed(fields)
            if arc:
                body = BodyHasher("relaxed")  # the AMS is relaxed/relaxed
        return Pending(policy, plan, fields, body, leading_space, arc)

    def finish(self, pending: Pending, env: Envelope) -> EomResult:
        plan = pending.plan
        if pending.body is None:
            if plan.why.startswith("(unsigned"):  # outbound mail we were asked to sign
                log_event("sign_skipped", level=logging.WARNING, milter=MILTER,
                          reason=plan.why[1:-1], queue_id=env.queue_id, ip=env.client_ip)
            return EomResult(Verdict.cont())
        settings: SignSettings = pending.policy.sections[MILTER]
        body_hash = pending.body.digest()
        now = int(self.clock())
        if pending.arc:
            return self._seal(pending, settings, body_hash, now, env)
        expire = now + int(settings.expire) if settings.expire else None
        edits = []
        for key in plan.keys:
            name, value = dkim_signature(
                key, pending.fields, body_hash, signed_headers=settings.headers,
                oversign=settings.oversign, canon=settings.canonicalization, timestamp=now,
                expire=expire)
            edits.append(self._header(name, value, pending.leading_space))
        log_event("signed", milter=MILTER, domain=plan.domain,
                  selectors=",".join(k.selector for k in plan.keys), rule=plan.why,
                  queue_id=env.queue_id)
        return EomResult(Verdict.cont(), edits)

    def _seal(self, pending: Pending, settings: SignSettings, body_hash: bytes, now: int,
              env: Envelope) -> EomResult:
        assert settings.arc.key is not None
        sealed = arc_seal.seal(pending.fields, body_hash, key=settings.arc.key,
                               authserv_id=self.authserv_id, timestamp=now)
        if isinstance(sealed, arc_seal.NotSealed):
            log_event("seal_skipped", level=logging.WARNING, milter=MILTER,
                      reason=sealed.reason, why=pending.arc, queue_id=env.queue_id)
            return EomResult(Verdict.cont())
        # AAR first, each at the top: AS ends above AMS above AAR
        edits = [self._header(name, value, pending.leading_space)
                 for name, value in reversed(sealed.fields)]
        log_event("sealed", milter=MILTER, instance=sealed.plan.instance,
                  cv=sealed.plan.chain_status, why=pending.arc, note=sealed.plan.note or None,
                  queue_id=env.queue_id)
        return EomResult(Verdict.cont(), edits)

    @staticmethod
    def _header(name: bytes, value: bytes, leading_space: bool) -> AddHeader:
        """Under HDR_LEADSPC the MTA writes "Name:" + value, so the space signed after the
        colon goes with it; else it writes "Name: value" itself. Folds as LF, which libmilter
        peers (Postfix) and our MTA both turn into CRLF."""
        if not leading_space:
            value = value.lstrip(b" ")
        elif not value.startswith(b" "):
            value = b" " + value
        return AddHeader(name.decode("ascii"), value.replace(b"\r\n", b"\n").decode("ascii"),
                         index=0)

    def sign_message(self, policy: Policy, message: Message) -> EomResult:
        """A whole message handed over (scan, tests): split it and stream its body."""
        raw = bytes(message.raw)
        found = _BLANK_LINE.search(raw)
        head, body = (raw[:found.start()], raw[found.end():]) if found else (raw, b"")
        pending = self.start(policy, message.envelope, _parse_head(head), True)
        if pending.body is not None:
            pending.body.feed(body)
        return self.finish(pending, message.envelope)


def _parse_head(head: bytes) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in _LINE_END.split(head):
        text = line.decode("utf-8", "surrogateescape")
        if text[:1] in (" ", "\t") and headers:
            headers[-1] = (headers[-1][0], headers[-1][1] + "\r\n" + text)
        elif ":" in text:
            name, _, value = text.partition(":")
            headers.append((name, value))
    return headers
