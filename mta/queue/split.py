"""Releasing a held message to some of its recipients only: the chosen recipients move to
a new queue entry of their own, which is released; the others stay held in the old one.

Crash-safe in three durable steps, the new entry written before the old one changes:
  1. the new entry (a copy of the message, the chosen recipients) is committed, still
     held, marked SPLIT_PENDING with the old ID;
  2. the old entry's envelope is rewritten without the chosen recipients;
  3. the new entry is released (hold and mark cleared in one envelope rewrite).
A crash after 1 leaves both entries held (nothing delivered twice, nothing lost);
Queue.recover() then finishes step 2 and leaves the new entry held for the admin to
release again. A crash after 2 leaves the new entry held the same way.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator, Sequence

from .spool import (RESUME_AFTER, RESUME_REQUESTED, Envelope, NoSuchMessage, Queue,
                    RecipientState, new_queue_id)

SPLIT_FROM = "split_from"  # envelope.extra: the entry this one was split from (kept)
SPLIT_PENDING = "split_pending"  # envelope.extra: step 3 not done yet
COPY_CHUNK = 1024 * 1024


@contextmanager
def locked(queue: Queue, queue_id: str) -> Iterator[None]:
    """One admin action at a time on a message (two consoles releasing it at once would
    deliver it twice). An advisory lock on the spool file; delivery never holds it, and
    never touches held mail."""
    try:
        fd = os.open(queue._message_path(queue_id), os.O_RDONLY)
    except FileNotFoundError:
        raise NoSuchMessage(f"no queued message {queue_id}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _matching(envelope: Envelope, addresses: Sequence[str]) -> list[RecipientState]:
    wanted = {address.strip().lower() for address in addresses}
    pending = {r.address.lower() for r in envelope.pending()}
    unknown = sorted(wanted - pending)
    if unknown:
        raise NoSuchMessage(f"message {envelope.queue_id} has no held recipient "
                            + ", ".join(unknown[:5]))
    return [r for r in envelope.pending() if r.address.lower() in wanted]


def split_release(queue: Queue, queue_id: str, addresses: Sequence[str]) -> str | None:
    """Release `addresses` of held message `queue_id`; returns the new entry's ID, or None
    when they were all its pending recipients (then the whole message is released)."""
    envelope, stored = queue.load(queue_id)
    if envelope.hold_reason is None:
        raise NoSuchMessage(f"message {queue_id} is not on hold")
    moving = _matching(envelope, addresses)
    if len(moving) == len(envelope.pending()):
        queue.release(queue_id)
        return None
    copy = Envelope(new_queue_id(), envelope.sender,
                    [RecipientState(r.address, r.params) for r in moving],
                    received_at=envelope.received_at, client_ip=envelope.client_ip,
                    helo=envelope.helo, hold_reason=envelope.hold_reason,
                    extra={**envelope.extra, SPLIT_FROM: queue_id, SPLIT_PENDING: queue_id})
    incoming = queue.receive(copy.queue_id)  # step 1: streamed, never all in memory
    try:
        with open(stored.path, "rb") as source:
            left = stored.size
            while left > 0:
                chunk = source.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise NoSuchMessage(f"queued message {queue_id} is shorter than recorded")
                incoming.write(chunk)
                left -= len(chunk)
    except BaseException:
        incoming.discard()
        raise
    incoming.commit(copy)
    moved = {r.address.lower() for r in moving}  # step 2
    envelope.recipients = [r for r in envelope.recipients
                           if not (r.status == "pending" and r.address.lower() in moved)]
    queue.update(envelope)
    if RESUME_AFTER in copy.extra:  # step 3: serve runs the later milters, then sends
        copy.extra[RESUME_REQUESTED] = "admin"
    else:
        copy.hold_reason, copy.next_attempt = None, 0.0  # step 3
    del copy.extra[SPLIT_PENDING]
    queue.update(copy)
    return copy.queue_id


def finish_splits(queue: Queue) -> list[str]:
    """After a crash: finish step 2 of every split cut short; returns the old IDs fixed.
    The new entries stay held (their release was never confirmed)."""
    fixed = []
    for copy in queue.entries():
        old_id = copy.extra.get(SPLIT_PENDING)
        if old_id is None:
            continue
        try:
            old = queue.envelope(old_id)
        except NoSuchMessage:
            old = None
        moved = {r.address.lower() for r in copy.recipients}
        if old is not None and any(r.address.lower() in moved for r in old.pending()):
            old.recipients = [r for r in old.recipients
                              if not (r.status == "pending" and r.address.lower() in moved)]
            queue.update(old)
            fixed.append(old_id)
        del copy.extra[SPLIT_PENDING]
        queue.update(copy)
    return fixed
