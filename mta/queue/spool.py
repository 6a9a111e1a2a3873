"""The durable on-disk queue: nothing is acknowledged before it is safely on disk.

Layout under the spool directory (like Postfix's, in spirit):

    tmp/            files being written; anything here after a crash is garbage
    active/ID.msg   the message as received, then its envelope as JSON in a trailer
    active/ID.env   the envelope once it changed (delivery attempts, hold), rewritten
                    atomically; when present it wins over the trailer

One spool file holds a message and its envelope: the SMTP server streams DATA into tmp/ID.msg,
appends the envelope trailer, fsyncs the file, renames it into active/ and fsyncs the
directory: only then may it answer 250. Two fsyncs per message, not three (a file for the
envelope would need its own). A file in active/ is complete by construction (rename is
atomic); recovery clears tmp/ and drops stray envelope files whose message is gone.

Trailer: the envelope JSON, "\n", then 16 bytes `MMENV1` + the JSON length in 9 digits +
"\n". Queue IDs are the receive time in microseconds plus a random part, in hex: they sort
by arrival and do not collide (the tmp file is created with O_EXCL).

The spool's format is in the file `format` (mta/queue/spool_format.py): an older spool is
upgraded when a Queue opens it, a newer one refused.

Held mail (quarantine, `mailmoat queue hold`) stays where it is with `hold_reason` set in its
envelope: holding and releasing are one atomic envelope rewrite, never a two-file move that
a crash could cut in half.
"""
from __future__ import annotations

import errno
import json
import os
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from milters.core.errors import MailmoatError

from .spool_format import FORMAT_FILE, upgrade_spool

ACTIVE, TMP = "active", "tmp"
KEPT_IN_MEMORY = 64 * 1024  # bytes of a message being received also kept for read()
TRAILER_MAGIC = b"MMENV1"
FOOTER = 16  # magic, 9 digits of JSON length, newline


# envelope.extra of a message held for review: the milter (its config name) whose edits held
# it; the milters after it run when it is released (mta/review/resume.py, in serve).
RESUME_AFTER = "resume_after"
# envelope.extra: an admin released such a message; serve's review runner carries it out.
RESUME_REQUESTED = "resume_requested"


class SpoolError(MailmoatError):
    """The spool cannot take the message (disk full, I/O error): answer 452 4.3.1."""


class NoSuchMessage(MailmoatError):
    """No queued message has this ID."""


@dataclass
class RecipientState:
    address: str
    params: str | None = None
    status: str = "pending"  # pending | delivered | bounced
    last_reply: str | None = None


@dataclass
class Envelope:
    queue_id: str
    sender: str
    recipients: list[RecipientState]
    received_at: float
    client_ip: str | None = None
    helo: str | None = None
    attempts: int = 0
    next_attempt: float = 0.0
    hold_reason: str | None = None
    size: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        # By hand: dataclasses.asdict's deep copy was a tenth of the MTA's time per message.
        return {"queue_id": self.queue_id, "sender": self.sender,
                "recipients": [{"address": r.address, "params": r.params, "status": r.status,
                                "last_reply": r.last_reply} for r in self.recipients],
                "received_at": self.received_at, "client_ip": self.client_ip,
                "helo": self.helo, "attempts": self.attempts,
                "next_attempt": self.next_attempt, "hold_reason": self.hold_reason,
                "size": self.size, "extra": dict(self.extra)}

    def to_json(self) -> bytes:
        # Default arguments: json reuses its one encoder (sort_keys made a new one each call).
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Envelope":
        raw = json.loads(data)
        raw["recipients"] = [RecipientState(**r) for r in raw["recipients"]]
        return cls(**raw)

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == "pending"]


def new_queue_id(now: float | None = None) -> str:
    micros = int((time.time() if now is None else now) * 1_000_000)
    # random's generator, not secrets': an ID need not be unguessable, only unlikely to
    # repeat within one microsecond (O_EXCL catches the rest), and secrets cost a syscall.
    return f"{micros:014X}{random.getrandbits(24):06X}"


def _trailer(envelope: Envelope) -> bytes:
    data = envelope.to_json()
    return data + b"\n" + TRAILER_MAGIC + b"%09d\n" % len(data)


def _read_trailer(path: str) -> tuple[Envelope, int] | None:
    """(envelope, message length) from a spool file's trailer; None if it has none."""
    with open(path, "rb") as stored:
        end = stored.seek(0, os.SEEK_END)
        if end < FOOTER:
            return None
        stored.seek(end - FOOTER)
        footer = stored.read(FOOTER)
        if not footer.startswith(TRAILER_MAGIC) or not footer[6:15].isdigit():
            return None
        length = int(footer[6:15])
        start = end - FOOTER - 1 - length
        if start < 0:
            return None
        stored.seek(start)
        data = stored.read(length)
    return Envelope.from_json(data), start


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str | Path, data: bytes) -> None:
    """Create `path` exclusively, write everything, fsync; remove it if anything fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(str(path))
        raise
    os.close(fd)


@dataclass(frozen=True)
class StoredMessage:
    """A queued message's text: the first `size` bytes of the spool file at `path`."""

    path: str  # not a Path: made for every delivery, and Path() cost more than the rest
    size: int


class Incoming:
    """A message being written into tmp/ as it arrives: commit() makes it durable and
    visible, discard() forgets it. Until commit() it is garbage to recover()."""

    def __init__(self, queue: "Queue", queue_id: str) -> None:
        self.queue, self.queue_id = queue, queue_id
        # Plain strings, not Path objects: this runs for every message on the SMTP path.
        self.path = f"{queue.tmp_dir}/{queue_id}.msg"
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0
        # What was written, while it is small: the milters get it from here, not from a
        # second open and read of the file (nine system calls for a 1 KB message).
        self._copy: bytearray | None = bytearray()

    def write(self, data: bytes) -> None:
        """Append; raises OSError (disk full...), after which only discard() is left."""
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)
        if self._copy is not None:
            if self.size <= KEPT_IN_MEMORY:
                self._copy += data
            else:
                self._copy = None

    def read(self) -> bytes:
        """The message as written so far (for milters that read the content)."""
        if self._copy is not None:
            return bytes(self._copy)
        with open(self.path, "rb") as stored:
            return stored.read()

    def kept(self) -> bytes | None:
        """The message as written so far if it is small enough to be kept in memory; None
        for a larger one (the first `size` bytes of `path`: read it from there)."""
        return None if self._copy is None else bytes(self._copy)

    def commit(self, envelope: Envelope, replacement: bytes | None = None, *,
               adopt: str | None = None) -> str:
        """fsync the message (or write `replacement` instead of what was streamed, or take
        the complete file `adopt` in tmp/ instead: the milter chain's edited text, never
        copied), write and fsync its envelope, rename both into active/ and fsync the
        directory: only then may the SMTP server answer 250. Raises SpoolError and leaves
        nothing behind."""
        assert self._fd is not None
        stored = f"{self.queue.active_dir}/{self.queue_id}.msg"
        try:
            if adopt is not None:
                fd = os.open(adopt, os.O_WRONLY | os.O_APPEND)
                self._close()
                _unlink_quietly(self.path)
                self._fd, self.path, self._copy = fd, adopt, None
                self.size = os.fstat(fd).st_size
            elif replacement is not None:
                os.ftruncate(self._fd, 0)
                os.lseek(self._fd, 0, os.SEEK_SET)
                self.size, self._copy = 0, None
                self.write(replacement)
            envelope.size = self.size
            self._copy = None  # the message is complete; the trailer is not part of it
            self.write(_trailer(envelope))
            os.fsync(self._fd)
            self._close()
            os.rename(self.path, stored)
            _fsync_dir(self.queue.active_dir)
        except OSError as exc:
            for leftover in (self.path, stored):
                _unlink_quietly(leftover)
            self._close()
            raise self.queue._spool_error(self.queue_id, exc) from None
        return self.queue_id

    def discard(self) -> None:
        self._close()
        _unlink_quietly(self.path)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Queue:
    def __init__(self, spool: str | Path) -> None:
        self.spool = Path(spool)
        if (self.spool / FORMAT_FILE).exists():  # before anything is made in a newer one
            upgrade_spool(self.spool)
        for name in (ACTIVE, TMP):
            (self.spool / name).mkdir(parents=True, exist_ok=True)
        upgrade_spool(self.spool)
        self.active_dir, self.tmp_dir = str(self.spool / ACTIVE), str(self.spool / TMP)

    # -- writing ---------------------------------------------------------------------------
    def receive(self, queue_id: str) -> "Incoming":
        """Start a message straight in tmp/ (the SMTP server streams DATA into it)."""
        return Incoming(self, queue_id)

    def enqueue(self, raw: bytes, envelope: Envelope) -> str:
        """Store durably; return the queue ID. Raises SpoolError, never half-writes."""
        try:
            incoming = self.receive(envelope.queue_id)
        except OSError as exc:
            raise self._spool_error(envelope.queue_id, exc) from None
        return incoming.commit(envelope, raw)

    def _spool_error(self, queue_id: str, exc: OSError) -> SpoolError:
        reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) \
            else (exc.strerror or str(exc))
        return SpoolError(f"spool {self.spool}: cannot store {queue_id}: {reason}")

    def update(self, envelope: Envelope) -> None:
        """Rewrite an envelope atomically (after a delivery attempt)."""
        where = self._locate(envelope.queue_id)
        staged = self.spool / TMP / f"{envelope.queue_id}.env.{secrets.token_hex(4)}"
        try:
            _write_durably(staged, envelope.to_json())
            os.rename(staged, where / f"{envelope.queue_id}.env")
            _fsync_dir(where)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise SpoolError(f"spool {self.spool}: cannot update {envelope.queue_id}: "
                             f"{exc.strerror or exc}") from None

    # -- reading ---------------------------------------------------------------------------
    def envelope(self, queue_id: str) -> Envelope:
        return self._stored(queue_id)[0]

    def message(self, queue_id: str) -> bytes:
        stored = self.stored(queue_id)
        with open(stored.path, "rb") as source:
            return source.read(stored.size)

    def stored(self, queue_id: str) -> "StoredMessage":
        """Where the message text is: the first `size` bytes of `path`."""
        return self.load(queue_id)[1]

    def load(self, queue_id: str) -> tuple[Envelope, "StoredMessage"]:
        """The envelope and where the text is, from one read of the spool file (delivery
        needs both for every message)."""
        envelope, size = self._stored(queue_id)
        return envelope, StoredMessage(self._message_path(queue_id), size)

    def entries(self) -> list[Envelope]:
        """Every complete entry, oldest first."""
        found = []
        for name in sorted(os.listdir(self.active_dir)):
            if not name.endswith(".msg"):
                continue
            try:
                found.append(self._stored(name[:-4])[0])
            except (OSError, ValueError, TypeError, NoSuchMessage):
                continue  # delivered and removed meanwhile, or being replaced
        return found

    def due(self, now: float) -> list[Envelope]:
        """Entries to try now: not held, and their retry time has come."""
        return [env for env in self.entries()
                if env.hold_reason is None and env.next_attempt <= now]

    # -- administration --------------------------------------------------------------------
    def remove(self, queue_id: str) -> None:
        """Forget a delivered message. No directory fsync: if power fails before the
        unlink reaches the disk, the message is delivered once more, never lost (as Postfix)."""
        path = self._message_path(queue_id)
        # The message first: a crash in between leaves a stray envelope (recovery drops it),
        # never a message with an out-of-date trailer that would be delivered again.
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise NoSuchMessage(f"no queued message {queue_id}") from None
        _unlink_quietly(path[:-4] + ".env")

    def hold(self, queue_id: str, reason: str = "held by the administrator") -> None:
        envelope = self.envelope(queue_id)
        envelope.hold_reason = reason
        self.update(envelope)

    def release(self, queue_id: str) -> None:
        envelope = self.envelope(queue_id)
        if envelope.hold_reason is None:
            raise NoSuchMessage(f"message {queue_id} is not on hold")
        if RESUME_AFTER in envelope.extra:
            # Held for review before later milters ran: serve runs them first (a release
            # here must never deliver it past them: no ZIP, no password notice).
            envelope.extra[RESUME_REQUESTED] = "admin"
        else:
            envelope.hold_reason, envelope.next_attempt = None, 0.0
        self.update(envelope)

    def flush(self) -> int:
        """Make every message that is not held due now; returns how many."""
        count = 0
        for envelope in self.entries():
            if envelope.hold_reason is None and envelope.next_attempt > 0:
                envelope.next_attempt = 0.0
                self.update(envelope)
                count += 1
        return count

    def recover(self) -> list[str]:
        """After a crash: clear tmp/, drop envelope files whose message is gone and files
        in active/ without a trailer (never renamed there by us, never acknowledged).
        Returns the queue IDs of messages removed."""
        removed = []
        for leftover in (self.spool / TMP).iterdir():
            leftover.unlink(missing_ok=True)
        for path in (self.spool / ACTIVE).iterdir():
            if path.suffix == ".env" and not path.with_suffix(".msg").exists():
                path.unlink(missing_ok=True)
            elif path.suffix == ".msg" and _read_trailer(str(path)) is None:
                path.unlink(missing_ok=True)
                removed.append(path.stem)
        from .split import finish_splits  # here: split.py builds on this module
        finish_splits(self)
        return removed

    # -- internals -------------------------------------------------------------------------
    def _message_path(self, queue_id: str) -> str:
        """Where the message would be (plain strings: this runs for every delivery)."""
        if not queue_id.isalnum():
            raise NoSuchMessage(f"'{queue_id}' is not a queue ID")
        return f"{self.active_dir}/{queue_id}.msg"

    def _locate(self, queue_id: str) -> Path:
        if os.path.exists(self._message_path(queue_id)):
            return self.spool / ACTIVE
        raise NoSuchMessage(f"no queued message {queue_id}")

    def _stored(self, queue_id: str) -> tuple[Envelope, int]:
        """The current envelope (the .env file if it was rewritten, else the trailer) and
        the message length."""
        path = self._message_path(queue_id)
        try:
            found = _read_trailer(path)
        except FileNotFoundError:
            raise NoSuchMessage(f"no queued message {queue_id}") from None
        if found is None:
            raise NoSuchMessage(f"queued message {queue_id} has no envelope (incomplete)")
        envelope, size = found
        try:
            with open(path[:-4] + ".env", "rb") as rewritten:
                envelope = Envelope.from_json(rewritten.read())
        except FileNotFoundError:
            pass
        return envelope, size
