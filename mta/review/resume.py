"""Releasing a message held for review: the milters after the one that held it run on it as
on a new message (connect with the envelope's client and HELO, MAIL, RCPT, the message), their
edits are applied, and the result is queued as a new entry; then the held one goes.

Crash-safe as split.py is: the new entry is durable (and names the old in RESUMED_FROM)
before anything else changes; the caller marks the review carried out, then the old entry is
removed (remove_resumed). A crash in between leaves both: `finish_resumes` (run when the
runner starts) removes an old entry whose resumed copy exists.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Callable

from milters.core.edits import ChangeHeader
from milters.core.eventlog import log_event
from milters.core.review import REVIEW_HEADER
from milters.core.verdict import Action

from mta.chain.async_driver import drive
from mta.chain.edits_apply import Transit, apply_edits, field_name
from mta.chain.message_text import MessageText
from mta.chain.session import (ChainMember, ChainSession, connect_macros, mail_macros,
                               rcpt_macros)
from mta.queue.spool import (RESUME_AFTER, RESUME_REQUESTED, Envelope, NoSuchMessage, Queue,
                             RecipientState, new_queue_id)

RESUMED_FROM = "resumed_from"  # envelope.extra of the new entry: the held one it replaces


class ResumeFailed(Exception):
    """The remaining milters refused or could not be reached: the message stays held."""


@dataclass(frozen=True)
class Resumed:
    new_id: str | None  # None: no recipient left (a milter removed them all)
    held: str | None  # the new entry's hold reason, when a later milter held it


def remaining(members: list[ChainMember], envelope: Envelope) -> list[ChainMember]:
    """The chain members after the one named in the envelope's RESUME_AFTER (all of the
    chain when that milter is no longer configured: never fewer checks than configured)."""
    name = envelope.extra.get(RESUME_AFTER)
    names = [m.endpoint.name for m in members]
    if name is None:
        return []
    if name not in names:
        return list(members)
    return members[names.index(name) + 1:]


async def resume(queue: Queue, queue_id: str, members: list[ChainMember],
                 chain_for: Callable[[list[ChainMember]], ChainSession],
                 hostname: str) -> Resumed:
    """Run the held entry `queue_id` through the rest of the chain and queue the result as
    a new entry (not yet removing the old: remove_resumed). ResumeFailed leaves it held."""
    envelope, stored = queue.load(queue_id)
    for entry in queue.entries():  # done before a crash: only the old one is left to remove
        if entry.extra.get(RESUMED_FROM) == queue_id:
            return Resumed(entry.queue_id, entry.hold_reason)
    rest = remaining(members, envelope)
    pending = [(r.address, r.params) for r in envelope.pending()]
    transit = Transit(MessageText(path=stored.path, size=stored.size), envelope.sender,
                      list(pending), workdir=queue.tmp_dir)
    transit = without_review_header(transit)
    new_id = new_queue_id()
    if rest and pending:
        transit = await _through(chain_for(rest), transit, envelope, new_id, hostname)
    if not transit.recipients:
        transit.remove_scratch()
        return Resumed(None, None)
    extra = {k: v for k, v in envelope.extra.items() if k not in (RESUME_AFTER,
                                                                 RESUME_REQUESTED)}
    extra[RESUMED_FROM] = queue_id
    copy = Envelope(new_id, transit.sender,
                    [RecipientState(a, p) for a, p in transit.recipients],
                    received_at=envelope.received_at, client_ip=envelope.client_ip,
                    helo=envelope.helo, hold_reason=transit.quarantine, extra=extra)
    incoming = queue.receive(new_id)
    try:
        if transit.text.path == stored.path:  # unchanged: a copy of the held text
            with open(stored.path, "rb") as source:
                left = stored.size
                while left > 0:
                    chunk = source.read(min(1 << 20, left))
                    if not chunk:
                        raise NoSuchMessage(f"queued message {queue_id} is shorter than "
                                            "recorded")
                    incoming.write(chunk)
                    left -= len(chunk)
            incoming.commit(copy)
        else:
            text = transit.text
            incoming.commit(copy, text.data, adopt=None if text.data is not None
                            else text.path)
    except BaseException:
        incoming.discard()
        raise
    finally:
        transit.remove_scratch(keep=transit.text.path if transit.text.data is None else None)
    log_event("review_resumed", queue_id=new_id, resumed_from=queue_id,
              milters=",".join(m.endpoint.name for m in rest) or None,
              held=transit.quarantine)
    return Resumed(new_id, transit.quarantine)


def without_review_header(transit: Transit) -> Transit:
    """The message without any X-Mailmoat-Review: the review's ID stays in the gateway (the
    later milters, DKIM signing among them, never see it either)."""
    fields, _ = transit.text.head()
    count = sum(1 for f in fields if field_name(f) == REVIEW_HEADER.lower())
    # Last first, so the indexes of the ones still to go stay right.
    return apply_edits(transit, [ChangeHeader(REVIEW_HEADER, index, "")
                                 for index in range(count, 0, -1)])


async def _through(chain: ChainSession, transit: Transit, envelope: Envelope, queue_id: str,
                   hostname: str) -> Transit:
    client = envelope.client_ip or "127.0.0.1"
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(client).version == 6 \
            else socket.AF_INET
    except ValueError:
        client, family = "127.0.0.1", socket.AF_INET
    auth_user = envelope.extra.get("auth_user")
    try:
        verdict = await drive(chain.g_connect(f"[{client}]", client, 25, family,
                                              connect_macros(hostname, client)))
        if not verdict.ends_transaction:
            verdict = await drive(chain.g_helo(envelope.helo or client))
        if not verdict.ends_transaction:
            verdict = await drive(chain.g_mail(envelope.sender, [], mail_macros(
                queue_id, envelope.sender, auth_user)))
        accepted = []
        if not verdict.ends_transaction:
            for address, params in transit.recipients:
                answer = await drive(chain.g_rcpt(address, params.split() if params else [],
                                                  rcpt_macros(queue_id, address)))
                if not answer.ends_transaction:
                    accepted.append((address, params))
            transit.recipients = accepted
            if accepted:
                verdict, transit = await drive(chain.g_message(transit, {"i": queue_id}))
    finally:
        chain.close()
    if verdict.ends_transaction and verdict.action is not Action.ACCEPT:
        transit.remove_scratch()
        log_event("review_resume_refused", level=logging.WARNING, queue_id=envelope.queue_id,
                  action=verdict.action.value, reply=str(verdict.reply or ""))
        raise ResumeFailed(f"the remaining milters said {verdict.action.value}: "
                           f"{verdict.reply or ''}".rstrip(": "))
    return transit


def remove_resumed(queue: Queue, queue_id: str) -> None:
    try:
        queue.remove(queue_id)
    except NoSuchMessage:
        pass


def finish_resumes(queue: Queue) -> list[Envelope]:
    """After a crash: remove held entries whose resumed copy is already queued; returns
    them (the caller marks their reviews carried out)."""
    entries = queue.entries()
    resumed = {e.extra.get(RESUMED_FROM) for e in entries} - {None}
    done = []
    for entry in entries:
        if entry.hold_reason is not None and entry.queue_id in resumed:
            remove_resumed(queue, entry.queue_id)
            done.append(entry)
    return done
