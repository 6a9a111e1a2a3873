"""The neutralize milter's work at end of message: decide whether the sender is suspicious,
then make every link inert, every attachment flat (or gone), refuse what is locked with a
password, and tell the recipient what was done.

The message is read through core.mime's byte ranges (spooled by the adapter, never parsed
whole) and its new body written in pieces; attachments are converted one at a time in the
sandbox (sandbox.py), which bounds how many run at once across all connections.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from milters.core.edits import AddHeader, ChangeHeader, Edit, EomResult
from milters.core.eventlog import log_event
from milters.core.message import Message
from milters.core.mime.locate import locate_attachments
from milters.core.mime.names import safe_name, split_ext
from milters.core.mime.parts import Attachment
from milters.core.mime.scan import Part, Raw, scan
from milters.core.mime.stream import NewPart, base64_lines, decode_to_file, rebuild
from milters.core.mime.write import file_part_header
from milters.core.policy.document import Policy
from milters.core.verdict import SmtpReply, Verdict

from .bodies import body_leaves, neutralize_bodies, readable
from .classify import conversion_for, kind_of
from .convert import Options
from .decide import decide
from .note import Changes, note_part, note_text
from .sandbox import Sandbox
from .settings import MILTER, NeutralizeSettings, Treatment
from .worker import Job, Outcome

MARK_HEADER = "X-Mailmoat-Neutralized"
_NEW_TYPES = {".pdf": "application/pdf", ".png": "image/png", ".jpg": "image/jpeg"}
LOCKABLE = ("archive", "office", "pdf")


class Refused(Exception):
    """The whole message gets this reply (encrypted content, or a conversion failure the
    policy answers with a reply)."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


@dataclass
class Context:
    message: Message
    settings: NeutralizeSettings
    treatment: Treatment


@dataclass
class FileResult:
    replacement: NewPart | None = None  # converted
    new_name: str = ""
    dropped: str = ""  # why it was removed ("" = kept or converted)
    output: BinaryIO | None = None

    def close(self) -> None:
        if self.output is not None:
            self.output.close()


def _side_by_side(calls: list[Callable[[], FileResult]],
                  width: int) -> list[FileResult | BaseException]:
    """Each call's result (or exception), in order, `width` at a time (each decodes its
    file before it waits for a sandbox slot: a message of 500 files must not decode them
    all at once). Daemon threads rather than a pool: at SIGTERM the milter must not wait
    for conversions; the sandbox kills them at exit."""
    outcomes: list[FileResult | BaseException] = [RuntimeError("not run")] * len(calls)

    def one(index: int) -> None:
        try:
            outcomes[index] = calls[index]()
        except BaseException as exc:  # handed to the caller, which re-raises it
            outcomes[index] = exc
    for start in range(0, len(calls), width):
        threads = [threading.Thread(target=one, args=(i,), name="neutralize-file", daemon=True)
                   for i in range(start, min(start + width, len(calls)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return outcomes


class NeutralizeChecker:
    def __init__(self, authserv_id: str,
                 sandbox_for: Callable[[NeutralizeSettings], Sandbox] | None = None) -> None:
        self.authserv_id = authserv_id
        self._sandboxes: dict[tuple[int, float], Sandbox] = {}
        self._sandboxes_lock = threading.Lock()
        self.sandbox_for = sandbox_for or self._shared_sandbox

    def _shared_sandbox(self, settings: NeutralizeSettings) -> Sandbox:
        """One sandbox (one pool of worker slots) per pool size, shared by all connections.
        Made under a lock: sessions that come together at start must not each make a pool
        of their own, or `workers` would bound each of them instead of all."""
        key = (settings.workers, settings.limits.wall)
        with self._sandboxes_lock:
            if key not in self._sandboxes:
                self._sandboxes[key] = Sandbox(settings.workers, settings.limits.wall)
            return self._sandboxes[key]

    def check(self, message: Message, policy: Policy) -> EomResult:
        settings: NeutralizeSettings = policy.sections[MILTER]
        # Nobody outside may tell the recipient that we have made a message safe.
        forged = [ChangeHeader(MARK_HEADER, 1, "") for name, _ in message.raw_headers()
                  if name.lower() == MARK_HEADER.lower()]
        decision = decide(policy, message, self.authserv_id)
        env = message.envelope
        if decision.treatment is None:
            return EomResult(Verdict.cont(f"trusted {decision.why}"), forged)
        changes = Changes()
        try:
            edits = self._neutralize(message, settings, decision.treatment, decision.why,
                                     changes)
        except Refused as refused:
            log_event("neutralize_refused", milter=MILTER, queue_id=env.queue_id,
                      rule=decision.why, reply=str(refused.verdict.reply),
                      reason=refused.verdict.reason)
            return EomResult(refused.verdict)
        log_event("neutralized", milter=MILTER, queue_id=env.queue_id, rule=decision.why,
                  links=changes.links, warnings=len(changes.warnings),
                  converted=len(changes.converted), dropped=len(changes.dropped),
                  html=changes.html or "-")
        return EomResult(Verdict.cont(changes.summary()), forged + edits
                         + [AddHeader(MARK_HEADER, f"{changes.summary()}; rule={decision.why}")])

    def _neutralize(self, message: Message, settings: NeutralizeSettings,
                    treatment: Treatment, why: str, changes: Changes) -> list[Edit]:
        ctx = Context(message, settings, treatment)
        raw = message.mime_raw
        root = scan(raw)
        found = locate_attachments(raw, root=root)
        removed: list[Part] = []
        replaced: list[tuple[Part, NewPart]] = []
        names = [a.filename or ("message.eml" if a.is_message else "attachment")
                 for a in found.attachments]
        # The files of one message are converted side by side; the sandbox's slots bound
        # how many conversions run at once across all connections.
        outcomes = _side_by_side([
            (lambda a=attachment, p=part, n=name: self._file(ctx, raw, a, p, n))
            for attachment, part, name in zip(found.attachments, found.parts, names)],
            settings.workers or os.cpu_count() or 1)
        results = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                for other in outcomes:  # the message is refused: let go of converted files
                    if isinstance(other, FileResult):
                        other.close()
                raise outcome
            results.append(outcome)
        kept_text: list[tuple[Part, Part | None]] = []
        for part, name, result in zip(found.parts, names, results):
            if result.replacement is not None:
                replaced.append((part, result.replacement))
                changes.converted.append((name, result.new_name))
            elif result.dropped:
                removed.append(part)
                changes.dropped.append((name, result.dropped))
            elif readable(part.skeleton.get_content_type()) and not part.children:
                # A text file or an attached message that stays: a client shows it in
                # line and links what it finds, so it is read like a body.
                kept_text.append((part, None))
        banner = ("mailmoat: links in this message were disabled because its sender could "
                  "not be trusted.")
        leaves = body_leaves(root, {id(a.part) for a in found.attachments}) + kept_text
        bodies = neutralize_bodies(raw, sorted(leaves, key=lambda leaf: leaf[0].start),
                                   treatment, banner, changes)
        removed += bodies.remove
        replaced += bodies.replace
        if not changes.any():
            return []
        note = note_part(note_text(changes, settings.language, why,
                                   message.envelope.queue_id or ""))
        rebuilt = rebuild(raw, root, removed, [note], replaced)
        present = {name.lower() for name, _ in message.raw_headers()}
        return rebuilt.edits(present)

    # -- one attachment -------------------------------------------------------------------
    def _file(self, ctx: Context, raw: Raw, attachment: Attachment, part: Part,
              name: str) -> FileResult:
        settings, treatment = ctx.settings, ctx.treatment
        limits = settings.limits
        if attachment.size > limits.attachment_size:
            return self._failed(ctx, name, f"larger than {limits.attachment_size} bytes")
        data = decode_to_file(raw, part)
        head = data.read(1024)
        data.seek(0)
        kind = kind_of(head, name, attachment.content_type, data)
        if treatment.attachments == "convert":
            action = conversion_for(kind, name, attachment.content_type, settings.convert)
        else:
            action = treatment.attachments  # keep | drop
        operation = _operation(action, kind)
        must_look = kind in LOCKABLE and not (action == "drop" and treatment.encrypted == "drop")
        if operation is None and not must_look:
            return FileResult(dropped=_drop_reason(action, kind)) if action != "keep" \
                else FileResult()
        suffix = split_ext(safe_name(name))[1].lower()[:10]
        outcome, output = self.sandbox_for(settings).convert(
            lambda source, target: _job(operation or "inspect", source, target, settings,
                                        check_locked=kind in LOCKABLE),
            data, suffix if suffix.isascii() else "")
        data.close()
        return self._outcome(ctx, outcome, output, operation, action, kind, name)

    def _outcome(self, ctx: Context, outcome: Outcome, output: BinaryIO | None,
                 operation: str | None, action: str, kind: str, name: str) -> FileResult:
        settings = ctx.settings
        if outcome.status == "locked":
            if output is not None:
                output.close()
            if ctx.treatment.encrypted == "reject":
                raise Refused(Verdict.reject(settings.encrypted_reply,
                                             reason=f"{name}: {outcome.reason}"))
            return FileResult(dropped=f"{outcome.reason}; locked files cannot be checked")
        if outcome.status == "unreadable":
            return self._unreadable(ctx, name, outcome.reason)
        if outcome.status == "failed":
            return self._failed(ctx, name, outcome.reason)
        if outcome.status == "converted" and output is not None:
            new_name = _new_name(name, operation or "", settings)
            header = file_part_header(new_name, _NEW_TYPES[split_ext(new_name)[1]])
            log_event("converted", milter=MILTER, queue_id=ctx.message.envelope.queue_id,
                      file=name, to=new_name, pages=outcome.pages or "-")
            return FileResult(NewPart(header, _closing(output)), new_name, output=output)
        if action == "keep":
            return FileResult()
        return FileResult(dropped=_drop_reason(action, kind))

    @staticmethod
    def _unreadable(ctx: Context, name: str, reason: str) -> FileResult:
        """A permanent condition: a retry in an hour reads the same broken bytes, so this
        is never a tempfail (neutralize.on_unreadable: drop | reject)."""
        settings = ctx.settings
        log_event("convert_unreadable", level=logging.WARNING, milter=MILTER,
                  queue_id=ctx.message.envelope.queue_id, file=name, reason=reason,
                  then=settings.on_unreadable)
        if settings.on_unreadable == "reject":
            raise Refused(Verdict.reject(settings.unreadable_reply,
                                         reason=f"{name}: {reason}"))
        return FileResult(dropped=f"it cannot be read ({reason})")

    @staticmethod
    def _failed(ctx: Context, name: str, reason: str) -> FileResult:
        settings = ctx.settings
        log_event("convert_failed", level=logging.WARNING, milter=MILTER,
                  queue_id=ctx.message.envelope.queue_id, file=name, reason=reason,
                  then=settings.on_failure)
        if settings.on_failure == "tempfail":
            raise Refused(Verdict.tempfail(settings.failure_reply, reason=f"{name}: {reason}"))
        if settings.on_failure == "reject":
            reply = SmtpReply(554, "5.7.0", f"{settings.failure_reply.text}")
            raise Refused(Verdict.reject(reply, reason=f"{name}: {reason}"))
        return FileResult(dropped=f"it could not be made safe ({reason})")


def _operation(action: str, kind: str) -> str | None:
    if action == "flatten" and kind in ("pdf", "office"):
        return "flatten-pdf" if kind == "pdf" else "flatten-office"
    if action in ("flatten", "image") and kind == "image":
        return "image"
    return None


def _drop_reason(action: str, kind: str) -> str:
    if action in ("flatten", "image"):
        return f"a file of this kind ({kind}) cannot be converted"
    return f"files of this kind ({kind}) are not accepted from this sender"


def _new_name(name: str, operation: str, settings: NeutralizeSettings) -> str:
    stem = split_ext(safe_name(name))[0]
    if operation == "image":
        return stem + (".jpg" if settings.image_format == "jpeg" else ".png")
    return stem + ".pdf"


def _job(operation: str, source: str, target: str, settings: NeutralizeSettings,
         check_locked: bool) -> Job:
    limits = settings.limits
    options = Options(dpi=settings.dpi, page_format=settings.page_format,
                      jpeg_quality=settings.jpeg_quality, image_format=settings.image_format,
                      pages=limits.pages, page_pixels=limits.page_pixels,
                      image_pixels=limits.image_pixels, soffice=settings.soffice,
                      wall=limits.wall)
    return Job(operation, source, target, options, check_locked=check_locked,
               archive_depth=limits.archive_depth, archive_bytes=limits.archive_bytes,
               cpu=limits.cpu, memory=limits.memory, processes=limits.processes,
               require_sandbox=settings.require_sandbox)


def _closing(output: BinaryIO) -> Iterator[bytes]:
    try:
        yield from base64_lines(output)
    finally:
        output.close()
