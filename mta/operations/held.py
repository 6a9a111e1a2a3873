"""The held-mail list: each held message with its envelope and decoded headers, searched,
filtered by reason and cut into pages; what a user sees is limited to their own mail."""
from __future__ import annotations

from dataclasses import dataclass, field

from mta.queue.spool import Envelope, NoSuchMessage, Queue

from .access import ActorLike
from .decode import decode_header
from .view import parse_head

HEAD_BYTES = 64 * 1024  # header fields read per message for the list
MAX_QUERY = 200
MAX_LIMIT = 500


@dataclass(frozen=True)
class HeldItem:
    queue_id: str
    sender: str
    recipients: list[str]  # pending ones, as far as this actor may see them
    subject: str
    from_: str
    message_id: str
    size: int
    received_at: float
    hold_reason: str
    why: str | None = None  # the milter or rule, from the audit story


@dataclass(frozen=True)
class HeldPage:
    items: list[HeldItem]
    total: int  # matching messages, all pages
    offset: int
    limit: int
    reasons: dict[str, int] = field(default_factory=dict)  # every hold reason this actor sees


@dataclass(frozen=True)
class Head:
    subject: str
    from_: str
    message_id: str


def read_head(queue: Queue, queue_id: str) -> Head:
    """Subject, From and Message-ID from the first HEAD_BYTES of the message."""
    stored = queue.stored(queue_id)
    with open(stored.path, "rb") as source:
        data = source.read(min(HEAD_BYTES, stored.size))
    end = min((i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0),
              default=len(data))
    head = parse_head(data[:end] + b"\r\n\r\n")
    return Head(decode_header(head.get("Subject"), 500), decode_header(head.get("From"), 500),
                decode_header(head.get("Message-ID"), 998))


def visible_recipients(actor: ActorLike, envelope: Envelope) -> list[str]:
    """All recipients for admin and auditor, and for the sender; a recipient sees only
    their own addresses (others may be Bcc)."""
    addresses = [r.address for r in envelope.recipients if r.status == "pending"] \
        or [r.address for r in envelope.recipients]
    if actor.role != "user":
        return addresses
    own = {a.lower() for a in actor.addresses}
    if envelope.sender.lower() in own:
        return addresses
    return [a for a in addresses if a.lower() in own]


def _matches(query: str, envelope: Envelope, head: Head, recipients: list[str]) -> bool:
    haystack = [envelope.sender, envelope.queue_id, head.subject, head.from_,
                head.message_id, *recipients]
    return any(query in value.lower() for value in haystack)


def held_page(queue: Queue, actor: ActorLike, visible: list[Envelope], *, query: str,
              reason: str | None, offset: int, limit: int) -> HeldPage:
    """`visible`: the held envelopes this actor may see, oldest first (newest come first)."""
    query = query.strip().lower()[:MAX_QUERY]
    offset, limit = max(0, int(offset)), min(max(1, int(limit)), MAX_LIMIT)
    reasons: dict[str, int] = {}
    found: list[HeldItem] = []
    for envelope in reversed(visible):
        assert envelope.hold_reason is not None
        reasons[envelope.hold_reason] = reasons.get(envelope.hold_reason, 0) + 1
        if reason is not None and envelope.hold_reason != reason:
            continue
        try:
            head = read_head(queue, envelope.queue_id)
        except (OSError, NoSuchMessage):
            continue  # released or deleted meanwhile
        recipients = visible_recipients(actor, envelope)
        if query and not _matches(query, envelope, head, recipients):
            continue
        found.append(HeldItem(envelope.queue_id, envelope.sender, recipients, head.subject,
                              head.from_, head.message_id, envelope.size,
                              envelope.received_at, envelope.hold_reason))
    return HeldPage(found[offset:offset + limit], len(found), offset, limit, reasons)

