"""One set of operations on held mail and the audit log: the CLI, the JSON API and the
console page are three views of these. Every call takes the actor and checks its role
(access.py); every change is written to the audit log with who and from where."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Protocol, Sequence

from milters.core.errors import MailmoatError
from milters.core.eventlog import log_event
from milters.core.review import parse_review_reason

from mta.queue.spool import Envelope, NoSuchMessage, Queue, SpoolError
from mta.queue.split import locked, split_release

from .access import (ActorLike, Forbidden, NotFound, OperationError, actor_label,
                     may_see, must_change, not_found)
from .held import HeldPage, held_page, read_head, visible_recipients
from .overview import MAX_BUCKETS, STEPS, Overview, bucket_starts, build_overview, top_sources
from .view import MAX_READ, MessageView, build_view

BULK_ACTIONS = ("release", "delete")
MAX_BULK = 1000
MAX_RECIPIENTS = 1000


class AuditLike(Protocol):
    """What Operations needs of milters/core/audit's AuditLog."""

    def append(self, event: str, *, queue_id: str | None = None,
               message_id: str | None = None, actor: str | None = None,
               source: str | None = None, now: float | None = None, **fields: Any) -> None: ...
    def flush(self) -> None: ...
    def story(self, queue_id: str) -> list[Any]: ...
    def search(self, **criteria: Any) -> list[Any]: ...
    def counts(self, *, since: float, until: float, step: int) -> dict[tuple[float, str], int]: ...
    def verify(self) -> Any: ...


@dataclass(frozen=True)
class ActionResult:
    queue_id: str
    action: str  # release | release_partly | delete | hold
    ok: bool
    detail: str  # what happened, or why not
    new_queue_id: str | None = None  # a partial release's new entry (the released part)


def why_held(records: Sequence[Any]) -> str | None:
    """The milter or rule that held a message, from its story (the latest hold)."""
    for record in reversed(records):
        fields = getattr(record, "fields", {}) or {}
        action = str(fields.get("action", "")).lower()
        if record.event in ("held", "quarantined") or action in ("quarantine", "hold"):
            who = fields.get("milter") or fields.get("rule") or record.actor or "?"
            reason = fields.get("reason") or fields.get("hold_reason") or ""
            return f"{who}: {reason}".rstrip(": ") if reason else str(who)
    return None


# Record fields that name addresses: one address, a list, or a comma-joined list (the
# `queued` event's rcpts, the attachments event's notice_to).
SENDER_FIELDS = ("sender", "from")
RECIPIENT_FIELDS = ("recipients", "recipient", "rcpt", "rcpts", "to", "notice_to")


def _addresses(value: Any) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else \
        str(value).split(",") if isinstance(value, str) else []
    return [item.strip().strip("<>").lower() for item in items
            if isinstance(item, str) and item.strip()]


def _record_addresses(record: Any) -> set[str]:
    fields = getattr(record, "fields", {}) or {}
    return {address for key in SENDER_FIELDS + RECIPIENT_FIELDS if key in fields
            for address in _addresses(fields[key])}


def _for_user(record: Any, own: set[str]) -> Any:
    """The record as a `user` may read it: unless they sent the message, its recipient
    lists keep only their own addresses (the others may have been Bcc)."""
    fields = getattr(record, "fields", {}) or {}
    if any(a in own for key in SENDER_FIELDS if key in fields for a in _addresses(fields[key])):
        return record
    kept = {key: (",".join(a for a in _addresses(value) if a in own)
                  if key in RECIPIENT_FIELDS else value)
            for key, value in fields.items()}
    return replace(record, fields=kept) if kept != fields else record


class Operations:
    def __init__(self, queue: Queue, audit: AuditLike | None = None, store: Any = None, *,
                 points_half_life: float | None = None,
                 review_book: Callable[[], Any] | None = None) -> None:
        # audit None: no audit log configured; actions are then only logged.
        self.queue, self.audit, self.store = queue, audit, store
        self.points_half_life = points_half_life
        # review_book opens the review book (milters.core.review) when a deleted message
        # is held for review: only then, so a gateway without reviews makes no book file.
        self._open_book, self._book = review_book, None

    # -- reading ---------------------------------------------------------------------------
    def entries(self, actor: ActorLike) -> list[Envelope]:
        """Every queued message this actor may see (held or not), oldest first."""
        return [env for env in self.queue.entries()
                if may_see(actor, env.sender, [r.address for r in env.recipients])]

    def held(self, actor: ActorLike, *, query: str = "", reason: str | None = None,
             offset: int = 0, limit: int = 50) -> HeldPage:
        visible = [env for env in self.entries(actor) if env.hold_reason is not None]
        page = held_page(self.queue, actor, visible, query=query, reason=reason,
                         offset=offset, limit=limit)
        if self.audit is None:
            return page
        items = [replace(item, why=why_held(self._story(item.queue_id))) for item in page.items]
        return HeldPage(items, page.total, page.offset, page.limit, page.reasons)

    def message(self, actor: ActorLike, queue_id: str) -> MessageView:
        envelope = self._visible(actor, queue_id)
        try:
            stored = self.queue.stored(queue_id)
            with open(stored.path, "rb") as source:
                data = source.read(min(stored.size, MAX_READ))
        except (OSError, NoSuchMessage):
            raise not_found(queue_id) from None
        shown = envelope.to_dict()
        shown["recipients"] = [r for r in shown["recipients"]
                               if r["address"] in visible_recipients(actor, envelope)]
        why = why_held(self._story(queue_id)) if envelope.hold_reason else None
        return build_view(queue_id, shown, data, stored.size, why)

    def original(self, actor: ActorLike, queue_id: str) -> bytes:
        self._visible(actor, queue_id)
        must_change(actor, "download the original of")
        try:
            data = self.queue.message(queue_id)
        except (OSError, NoSuchMessage):
            raise not_found(queue_id) from None
        self._record("downloaded", actor, queue_id, self._message_id(queue_id), size=len(data))
        return data

    def story(self, actor: ActorLike, queue_id: str) -> list[Any]:
        records = self._story(queue_id)
        if actor.role == "user":
            try:
                self._visible(actor, queue_id)
            except NotFound:  # gone from the queue: the story must name one of theirs
                own = {a.lower() for a in actor.addresses}
                if not records or not any(_record_addresses(r) & own for r in records):
                    raise not_found(queue_id) from None
            own = {a.lower() for a in actor.addresses}
            return [_for_user(record, own) for record in records]
        else:
            may_see(actor, "", [])  # checks the role
            if not records:
                self._visible(actor, queue_id)
        return records

    def search_audit(self, actor: ActorLike, **criteria: Any) -> list[Any]:
        if self.audit is None:
            return []
        if actor.role != "user":
            may_see(actor, "", [])
            return list(self.audit.search(**criteria))
        # A user searches within their own addresses only, whatever they asked for.
        own = sorted(a.lower() for a in actor.addresses)
        asked = criteria.pop("address", None)
        addresses = own if asked is None else [a for a in own if a == str(asked).lower()]
        seen: dict[int, Any] = {}
        for address in addresses:
            for record in self.audit.search(address=address, **criteria):
                if _record_addresses(record) & set(own):
                    seen[record.seq] = record
        # Newest first and at most `limit`, as AuditLog.search answers an admin.
        limit = max(1, int(criteria.get("limit", 200)))
        return [_for_user(seen[seq], set(own)) for seq in sorted(seen, reverse=True)[:limit]]

    def overview(self, actor: ActorLike, *, now: float, step: int, buckets: int) -> Overview:
        may_see(actor, "", [])
        if actor.role == "user":
            raise Forbidden(f"{actor.name} (user) may not see the gateway's overview")
        if step not in STEPS:
            raise OperationError(f"step must be one of {STEPS} seconds (got {step})")
        buckets = min(max(1, int(buckets)), MAX_BUCKETS)
        starts = bucket_starts(now, step, buckets)
        counts = {} if self.audit is None else \
            self.audit.counts(since=starts[0], until=starts[-1] + step, step=step)
        return build_overview(counts, starts, step,
                              top_sources(self.store, now, self.points_half_life))

    def verify_audit(self, actor: ActorLike) -> Any:
        """The audit log's chain check (milters/core/audit VerifyResult), for admins and
        auditors; None when no audit log is configured. It reads every record: seconds on
        a large log, so the console runs it only when asked."""
        may_see(actor, "", [])
        if actor.role == "user":
            raise Forbidden(f"{actor.name} (user) may not verify the audit log")
        return None if self.audit is None else self.audit.verify()

    # -- changing --------------------------------------------------------------------------
    def release(self, actor: ActorLike, queue_id: str,
                recipients: Sequence[str] | None = None) -> ActionResult:
        envelope = self._visible(actor, queue_id)
        must_change(actor, "release")
        if recipients is not None and not recipients:
            raise OperationError("name at least one recipient to release to")
        if recipients is not None and len(recipients) > MAX_RECIPIENTS:
            raise OperationError(f"at most {MAX_RECIPIENTS} recipients at once")
        message_id = self._message_id(queue_id)
        with self._lock(queue_id):
            envelope = self._current(queue_id)
            if envelope.hold_reason is None:
                raise OperationError(f"message {queue_id} is not on hold")
            try:
                if recipients is None:
                    self.queue.release(queue_id)
                    new_id = None
                else:
                    new_id = split_release(self.queue, queue_id, recipients)
            except NoSuchMessage as exc:
                raise OperationError(str(exc)) from None
        if new_id is None:
            released = [r.address for r in envelope.pending()]
            self._record("released", actor, queue_id, message_id, recipients=released,
                         hold_reason=envelope.hold_reason)
            return ActionResult(queue_id, "release", True, "released")
        moved = sorted({a.strip().lower() for a in recipients or []})
        self._record("released_partly", actor, queue_id, message_id, recipients=moved,
                     new_queue_id=new_id, hold_reason=envelope.hold_reason)
        return ActionResult(queue_id, "release_partly", True,
                            f"released to {', '.join(moved)} as {new_id}; the rest stay held",
                            new_id)

    def delete(self, actor: ActorLike, queue_id: str) -> ActionResult:
        self._visible(actor, queue_id)
        must_change(actor, "delete")
        message_id = self._message_id(queue_id)
        with self._lock(queue_id):
            envelope = self._current(queue_id)
            # The review first: a crash before the removal leaves a held message whose
            # review is carried out (serve's review runner removes it), never a pending
            # review without its message.
            review = self._withdraw_review(actor, envelope)
            try:
                self.queue.remove(queue_id)
            except NoSuchMessage:
                raise not_found(queue_id) from None
        extra = {"review": review} if review else {}
        self._record("removed", actor, queue_id, message_id,
                     recipients=[r.address for r in envelope.pending()],
                     hold_reason=envelope.hold_reason, **extra)
        return ActionResult(queue_id, "delete", True, "deleted")

    def _withdraw_review(self, actor: ActorLike, envelope: Envelope) -> str | None:
        """Cancel the review that holds this message (its ID), or None when none does. A
        copy split off for some recipients shares the reason but not the review."""
        found = parse_review_reason(envelope.hold_reason)
        if found is None or self._open_book is None:
            return None
        try:
            if self._book is None:
                self._book = self._open_book()
            record = self._book.get(found[1])
            if record is None or record.queue_id != envelope.queue_id:
                return None
            self._book.withdraw(record.id, actor_label(actor), actor.source,
                                "deleted from the queue")
        except MailmoatError as exc:  # the book unreachable: keep the message and its review
            raise OperationError(f"message {envelope.queue_id} is held for review and the "
                                 f"review book cannot be reached ({exc}); not deleted") from None
        return record.id

    def hold(self, actor: ActorLike, queue_id: str,
             reason: str = "held by the administrator") -> ActionResult:
        self._visible(actor, queue_id)
        must_change(actor, "hold")
        with self._lock(queue_id):
            self.queue.hold(queue_id, reason)
        self._record("held", actor, queue_id, self._message_id(queue_id), reason=reason)
        return ActionResult(queue_id, "hold", True, "on hold")

    def flush(self, actor: ActorLike) -> int:
        must_change(actor, "flush")
        return self.queue.flush()

    def bulk(self, actor: ActorLike, action: str, queue_ids: Sequence[str]) -> list[ActionResult]:
        """Each ID on its own: one that fails (gone, not visible) does not stop the rest."""
        if action not in BULK_ACTIONS:
            raise OperationError(f"bulk action must be one of {', '.join(BULK_ACTIONS)} "
                                 f"(got {str(action)[:40]!r})")
        if len(queue_ids) > MAX_BULK:
            raise OperationError(f"at most {MAX_BULK} messages at once (got {len(queue_ids)})")
        must_change(actor, action)
        results = []
        for queue_id in dict.fromkeys(str(q) for q in queue_ids):  # each once
            try:
                done = self.release(actor, queue_id) if action == "release" \
                    else self.delete(actor, queue_id)
            except (OperationError, SpoolError) as exc:
                done = ActionResult(queue_id, action, False, str(exc))
            results.append(done)
        return results

    # -- internals -------------------------------------------------------------------------
    def _visible(self, actor: ActorLike, queue_id: str) -> Envelope:
        """The envelope, or NotFound alike for a missing message and one not this actor's."""
        envelope = self._current(queue_id)
        if not may_see(actor, envelope.sender, [r.address for r in envelope.recipients]):
            raise not_found(queue_id)
        return envelope

    def _current(self, queue_id: str) -> Envelope:
        try:
            return self.queue.envelope(str(queue_id))
        except (NoSuchMessage, OSError, ValueError, TypeError, KeyError):
            raise not_found(str(queue_id)) from None

    @contextmanager
    def _lock(self, queue_id: str) -> Iterator[None]:
        try:
            with locked(self.queue, queue_id):
                yield
        except NoSuchMessage:
            raise not_found(queue_id) from None

    def _message_id(self, queue_id: str) -> str | None:
        try:
            return read_head(self.queue, queue_id).message_id or None
        except (OSError, NoSuchMessage):
            return None

    def _story(self, queue_id: str) -> list[Any]:
        return [] if self.audit is None else list(self.audit.story(queue_id))

    def _record(self, event: str, actor: ActorLike, queue_id: str, message_id: str | None,
                **fields: Any) -> None:
        """The audit record (flushed at once: an admin action is rare and must not be lost)
        and a log line `queue_action` (not the audit tee's event names: no record twice)."""
        who = actor_label(actor)
        log_event("queue_action", action=event, queue_id=queue_id, actor=who,
                  source=actor.source,
                  **{k: (",".join(v) if isinstance(v, list) else v) for k, v in fields.items()})
        if self.audit is not None:
            self.audit.append(event, queue_id=queue_id, message_id=message_id, actor=who,
                              source=actor.source, **fields)
            self.audit.flush()
