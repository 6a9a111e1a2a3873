"""The attachments milter's decision at end of message: which recipients get which copy,
the transformed copies re-injected for the recipients they belong to (and removed from the
original with delrcpt), the original edited in place for the rest, and the password notice.

Nothing is lost or doubled on failure: every re-injection happens before the original is
let through; if one fails, the whole message is tempfailed and the sender's MTA retries.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from milters.core.edits import AddHeader, ChangeHeader, DeleteRecipient, Edit, EomResult
from milters.core.errors import ConfigError
from milters.core.eventlog import log_event
from milters.core.message import Message, decode_words
from milters.core.policy.document import Policy
from milters.core.policy.matching import match_address, parse_network_pattern
from milters.core.policy.matching import network_matches
from milters.core.secrets import SecretSource, read_secret
from milters.core.verdict import SmtpReply, Verdict

from .decide import groups, has_keyword, modes_for, strip_keyword
from .notice import ascii_or_empty, build_notice, format_date, format_recipients, load_template
from .password import fixed_password, generate_password
from milters.core.mime.stream import copy_header
from milters.core.reinject import ReinjectError, reinject
from .settings import MILTER, AttachmentsSettings
from .nextcloud import NextcloudError
from .treat import (Finding, TooLarge, Treated, Unparsable, check_total_size, delete, encrypt,
                    find, offload)

LOOP_HEADER = "X-Mailmoat-Attachments"
LOOPBACK = (parse_network_pattern("127.0.0.0/8"), parse_network_pattern("::1/128"))
TEMPFAIL = SmtpReply(451, "4.3.0", "Temporary problem handling the attachments; "
                                   "try again later")
# RFC 3463 X.3.4: too big for this system. Temporary, as Postfix answers a message over a
# resource limit it may have room for later; the sender's MTA retries, then bounces.
TOO_LARGE = SmtpReply(451, "4.3.4", "Attachments too large to protect here; try again "
                                    "later or share them another way")
Sender = Callable[[str, str, list[str], bytes, float], str]


class CannotTreat(Exception):
    """The message cannot be treated now (a secret unreadable, attachments over
    max_total_size): it is tempfailed, never let through untreated."""


class OffloadFailed(CannotTreat):
    """Nextcloud failed and the policy says tempfail."""


@dataclass
class Context:
    settings: AttachmentsSettings
    message: Message
    now: datetime
    password: str = ""
    finding: Finding | None = None


def _send(listen: str, mail_from: str, recipients: list[str], raw: bytes,
          timeout: float) -> str:
    return reinject(listen, mail_from, recipients, raw, timeout)


def encode_subject(text: str, like: str) -> str:
    """A changed subject, encoded the way the original was (ISO-2022-JP stays ISO-2022-JP)."""
    if text.isascii():
        return text
    charset = "iso-2022-jp" if "iso-2022-jp" in like.lower() else "utf-8"
    try:
        return Header(text, charset).encode()
    except UnicodeError:  # characters outside JIS X 0208 (e.g. Windows extensions)
        return Header(text, "utf-8").encode()


class AttachmentsChecker:
    def __init__(self, hostname: str, reinject_listen: str,
                 clock: Callable[[], datetime] = lambda: datetime.now().astimezone(),
                 send: Sender = _send) -> None:
        self.hostname = hostname
        self.listen = reinject_listen
        self.clock = clock
        self.send = send

    def check(self, message: Message, policy: Policy) -> EomResult:
        settings: AttachmentsSettings = policy.sections[MILTER]
        env = message.envelope
        if message.raw_header(LOOP_HEADER) is not None and \
                network_matches(env.client_address, LOOPBACK):
            return EomResult(Verdict.cont("treated already (loop guard)"))
        subject = message.raw_header("Subject") or ""
        modes = modes_for(policy, env, subject)
        grouped = groups(modes)
        subject_edits = self._keyword_edits(subject, settings)
        if set(grouped) <= {"pass"}:
            return EomResult(Verdict.cont(), subject_edits)
        ctx = Context(settings, message, self.clock())
        try:
            treated = self._treat(ctx, grouped, env.mail_from or "")
        except Unparsable as exc:  # attachments.on_unparsable: tempfail
            log_event("attachments_unparsable", level=logging.WARNING, milter=MILTER,
                      queue_id=env.queue_id, reason=str(exc), then="tempfail")
            return EomResult(Verdict.tempfail(TEMPFAIL, reason=f"unparsable: {exc}"))
        except (CannotTreat, TooLarge) as exc:
            log_event("attachments_failed", level=logging.ERROR, milter=MILTER,
                      queue_id=env.queue_id, error=str(exc))
            reply = TOO_LARGE if isinstance(exc, TooLarge) else TEMPFAIL
            return EomResult(Verdict.tempfail(reply, reason=str(exc)))
        if treated is None:  # no attachments: nothing to protect
            return EomResult(Verdict.cont("no attachments"), subject_edits)
        try:
            return self._deliver(ctx, grouped, treated, subject_edits)
        except (ReinjectError, OffloadFailed) as exc:
            log_event("attachments_failed", level=logging.ERROR, milter=MILTER,
                      queue_id=env.queue_id, error=str(exc))
            return EomResult(Verdict.tempfail(TEMPFAIL, reason=str(exc)))

    # -- steps -----------------------------------------------------------------------------
    def _keyword_edits(self, subject: str, settings: AttachmentsSettings) -> list[Edit]:
        if not has_keyword(subject, settings.subject_keyword):
            return []
        stripped = strip_keyword(subject, settings.subject_keyword)
        return [ChangeHeader("Subject", 1, encode_subject(stripped, subject))]

    def _treat(self, ctx: Context, grouped: dict[str, list[str]],
               sender: str) -> dict[str, Treated] | None:
        """Each group's copy; None when the message has no attachments. An offload that
        falls back to encrypt moves its recipients into the encrypt group (made last)."""
        ctx.finding = finding = find(ctx.message.mime_raw, ctx.settings)
        self._log_doubts(ctx, finding)
        found, raw = finding.found, ctx.message.mime_raw
        check_total_size(raw, found, ctx.settings)
        treated: dict[str, Treated] = {}
        for mode in [m for m in list(grouped) if m != "pass"] + ["encrypt"]:
            if mode not in grouped or mode in treated:
                continue
            if mode in ("encrypt", "offload") and not ctx.password:
                ctx.password = self._password(ctx, grouped[mode])
            if mode == "encrypt":
                result = encrypt(raw, found, ctx.settings, ctx.password, ctx.now, sender)
            elif mode == "offload":
                result = self._offload(ctx, grouped, sender)
                if result is None and "offload" not in grouped:
                    continue  # fell back: its recipients are in the encrypt group now
            else:
                result = delete(raw, found, ctx.settings, sender)
            if result is None:
                return None
            treated[mode] = result
        return treated

    @staticmethod
    def _log_doubts(ctx: Context, finding: Finding) -> None:
        """What certainty.py could not vouch for, so an admin sees why a message went whole
        into a ZIP or a text part became a file."""
        env = ctx.message.envelope
        if finding.whole:
            log_event("attachments_unparsable", level=logging.WARNING, milter=MILTER,
                      queue_id=env.queue_id, reason=finding.whole, then="encrypt_whole")
        if finding.doubted:
            log_event("attachments_doubted", milter=MILTER, queue_id=env.queue_id,
                      parts=len(finding.doubted), reasons=";".join(finding.doubted))

    def _offload(self, ctx: Context, grouped: dict[str, list[str]],
                 sender: str) -> Treated | None:
        """Nextcloud, or what offload.on_failure says when it fails: tempfail (raised as
        ReinjectError's sibling below) or a ZIP for these recipients instead."""
        try:
            return offload(ctx.message.mime_raw, ctx.finding.found if ctx.finding else None,
                           ctx.settings, ctx.password, ctx.now, sender,
                           ascii_or_empty(ctx.message.raw_header("Message-ID")))
        except ConfigError as exc:  # the app password cannot be read: never pass in clear
            raise CannotTreat(f"offload: {exc}") from None
        except NextcloudError as exc:
            env = ctx.message.envelope
            fallback = ctx.settings.offload.on_failure
            log_event("offload_failed", level=logging.ERROR, milter=MILTER,
                      queue_id=env.queue_id, error=str(exc), transient=exc.transient,
                      then=fallback)
            if fallback != "encrypt":
                raise OffloadFailed(str(exc)) from None
            # The ZIP goes to these recipients instead: they join the encrypt group.
            grouped.setdefault("encrypt", [])
            grouped["encrypt"] += grouped.pop("offload")
            return None

    def _password(self, ctx: Context, recipients: list[str]) -> str:
        """A partner's agreed password when every recipient of the copy has the same one;
        otherwise a fresh random one for this message."""
        pw = ctx.settings.encrypt.password
        chosen = set()
        for rcpt in recipients:
            entry = next((f for f in pw.fixed if match_address(rcpt, f.recipients).matched),
                         None)
            chosen.add(entry.source if entry else None)
        if len(chosen) == 1 and None not in chosen:
            source: SecretSource = chosen.pop()  # type: ignore[assignment]
            try:
                return fixed_password(read_secret(source, "attachments.encrypt.password."
                                                          "fixed"), ctx.now)
            except (ConfigError, ValueError) as exc:  # the messages never hold the secret
                raise CannotTreat(f"the partner's agreed password: {exc}") from None
        return generate_password(pw.length, pw.alphabet or _default_alphabet(),
                                 exclude_ambiguous=pw.exclude_ambiguous)

    def _deliver(self, ctx: Context, grouped: dict[str, list[str]],
                 treated: dict[str, Treated], subject_edits: list[Edit]) -> EomResult:
        env = ctx.message.envelope
        stay = "pass" if "pass" in grouped else next(iter(grouped))
        edits: list[Edit] = list(subject_edits)
        for mode, recipients in grouped.items():
            if mode == stay:
                continue
            rebuilt = treated[mode].rebuilt
            header = copy_header(ctx.message.mime_raw, {**rebuilt.mime_headers,
                                                  **self._subject_changes(subject_edits)},
                                 [(LOOP_HEADER, f"copy by {self.hostname}")])
            self.send(self.listen, env.mail_from or "", recipients,
                      _pieces(header, rebuilt.body), ctx.settings.reinject_timeout)
            edits += [DeleteRecipient(r) for r in recipients]
        if stay in treated:
            present = [name for name, _ in ctx.message.raw_headers()]
            edits += treated[stay].rebuilt.edits(present)
            edits.append(AddHeader(LOOP_HEADER, f"{stay} by {self.hostname}"))
        notified: dict[str, list[str]] = {}
        for mode in ("encrypt", "offload"):
            if mode in treated:
                notified[mode] = self._notify(ctx, grouped[mode], treated[mode])
        for mode, recipients in grouped.items():
            fields: dict[str, object] = {"queue_id": env.queue_id, "action": mode,
                                         "rcpts": ",".join(recipients)}
            if mode in treated:
                fields["files"] = len(treated[mode].files)
                fields["delivered"] = "in place" if mode == stay else "re-injected"
            if mode in ("encrypt", "offload") and mode in treated:
                fields["zip" if mode == "encrypt" else "offloaded"] = treated[mode].zip_name
                fields["notice_to"] = ",".join(notified.get(mode, [])) or None
                if ctx.settings.notice.log_password:
                    fields["password"] = ctx.password
            log_event("attachments", milter=MILTER, **fields)
        return EomResult(Verdict.cont(), edits)

    @staticmethod
    def _subject_changes(subject_edits: list[Edit]) -> dict[str, str | None]:
        return {edit.name: edit.value.strip() for edit in subject_edits
                if isinstance(edit, ChangeHeader)}

    def _notify(self, ctx: Context, recipients: list[str], treated: Treated) -> list[str]:
        """Send the password notice; to whom (the audit log's story names them)."""
        settings, env = ctx.settings, ctx.message.envelope
        notice = settings.notice
        to: list[str] = []
        if notice.to in ("sender", "both") and env.mail_from:
            to.append(env.mail_from)
        if notice.to in ("recipients", "both"):
            to += recipients
        if not to:
            return []
        kind = "offload-password" if treated.expires else "password"
        template = load_template(kind, notice.language,
                                 Path(notice.templates) if notice.templates else None)
        subject = decode_words(ctx.message.raw_header("Subject") or "")
        if has_keyword(subject, settings.subject_keyword):
            subject = strip_keyword(subject, settings.subject_keyword)
        values = {
            "subject": subject,
            "date": format_date(ctx.message.raw_header("Date"), notice.language),
            "password": ctx.password, "recipients": format_recipients(recipients),
            "filename": treated.zip_name, "sender": env.mail_from or "",
            "expires": treated.expires,
        }
        raw = build_notice(template=template, values=values,
                           from_addr=notice.sender or f"postmaster@{self.hostname}",
                           to_addrs=to,
                           original_message_id=ctx.message.raw_header("Message-ID"),
                           original_references=ctx.message.raw_header("References"),
                           hostname=self.hostname, date=ctx.now,
                           loop_header=(LOOP_HEADER, "password notice"))
        self.send(self.listen, "", to, raw, settings.reinject_timeout)
        return to


def _pieces(header: bytes, body: BinaryIO) -> Iterator[bytes]:
    yield header
    while piece := body.read(65536):
        yield piece


def _default_alphabet() -> str:
    from .password import DEFAULT_ALPHABET
    return DEFAULT_ALPHABET
