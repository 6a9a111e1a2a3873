"""The digest mails: per person, one mail listing what waits on them.

    builder = DigestBuilder(audiences=("senders", "recipients", "approvers"), max_items=200,
                            domains=("example.jp",), issue_link=..., held_link=...)
    for record in book.pending(limit=...):
        builder.add_review(record)
    for envelope in held_newest_first:                 # quarantined, not review holds
        builder.add_held(queue_id, sender, pending_recipients, received_at, reason)
    for digest in builder.digests(subject_of):        # subject_of(queue_id): read bounded
        raw = DigestRenderer(from_addr, hostname).render(digest, now)

A person's digest has three lists: their messages held for review (with fresh send now /
confirm / cancel links), the approvals waiting for their decision (approve / reject links)
and the quarantined mail they sent or that waits for them (a console link; releasing it is
an administrator's). Each list keeps at most `max_items` entries and counts the rest, so a
flood of 10,000 held messages makes a digest of bounded size; links and subjects are made
only for the entries that are shown. A recipient sees only their own address of a
quarantined message (the others may be Bcc).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Callable, Iterable, Mapping

from .mail import build_mail, one_line
from .notices import LANGUAGES, Template, fill, format_time, read_template
from .record import ReviewRecord, involves

AUDIENCES = ("senders", "recipients", "approvers")
PLACEHOLDERS = frozenset({"person", "date", "count", "reviews", "approvals", "held"})
SENDER_LINKS = {"delay": ("send_now", "cancel"), "confirm": ("confirm", "cancel"),
                "approve": ("cancel",)}
APPROVER_LINKS = ("approve", "reject")
MAX_NAMED = 10  # recipients or files named per entry
MAX_SUBJECT = 200  # characters of a subject shown
IssueLink = Callable[[str, str, str, float], str]  # (review ID, person, action, expires)

_LABELS = {
    "en": {
        "reviews": "Your messages held for review ({n}):",
        "approvals": "Approvals waiting for your decision ({n}):",
        "held": "Quarantined mail ({n}):",
        "held_note": ("Quarantined mail is released only by an administrator: ask your "
                      "administrator if a message should be delivered. The link shows it in "
                      "the console (log in first)."),
        "more": "... and {n} more (see the console)",
        "named_more": "... and {n} more",
        "none": "(none)", "no_subject": "(no subject)",
        "to": "To", "from": "From", "files": "Attachments", "received": "Received",
        "reason": "Reason", "view": "View", "decide_by": "Decide by",
        "delay": "Held until {deadline}; sent then unless you cancel it.",
        "confirm": "Waits for your confirmation until {deadline}; not sent without it.",
        "approve": "Waits for approval by {approver} until {deadline}.",
        "send_now": "Send now", "confirm_link": "Confirm and send", "cancel": "Cancel",
        "approve_link": "Approve", "reject": "Reject",
    },
    "ja": {
        "reviews": "■送信保留中のあなたのメール（{n} 件）",
        "approvals": "■あなたの承認を待っているメール（{n} 件）",
        "held": "■隔離されたメール（{n} 件）",
        "held_note": ("隔離されたメールの配送は管理者のみが行えます。配送が必要な場合は"
                      "管理者にお問い合わせください。リンクからコンソールで内容を確認できます"
                      "（ログインが必要です）。"),
        "more": "... 他 {n} 件（コンソールでご確認ください）",
        "named_more": "... 他 {n} 件",
        "none": "(なし)", "no_subject": "(件名なし)",
        "to": "宛先", "from": "差出人", "files": "添付ファイル", "received": "受信日時",
        "reason": "理由", "view": "確認する", "decide_by": "期限",
        "delay": "{deadline} に送信されます。誤りがあれば取り消してください。",
        "confirm": "{deadline} までに確認がない場合、送信されません。",
        "approve": "承認者 {approver} の承認を待っています（期限：{deadline}）。",
        "send_now": "すぐに送信する", "confirm_link": "確認して送信する",
        "cancel": "送信を取り消す", "approve_link": "承認する", "reject": "却下する",
    },
}


@dataclass(frozen=True)
class ReviewEntry:
    record: ReviewRecord
    links: Mapping[str, str]  # action -> URL


@dataclass(frozen=True)
class HeldEntry:
    queue_id: str
    sender: str
    recipients: tuple[str, ...]  # as this person may see them
    subject: str
    received_at: float
    reason: str
    link: str  # the console's page of the message


@dataclass
class Digest:
    person: str
    language: str
    reviews: list[ReviewEntry] = field(default_factory=list)
    approvals: list[ReviewEntry] = field(default_factory=list)
    held: list[HeldEntry] = field(default_factory=list)
    more_reviews: int = 0
    more_approvals: int = 0
    more_held: int = 0

    @property
    def counts(self) -> tuple[int, int, int]:
        return (len(self.reviews) + self.more_reviews, len(self.approvals) + self.more_approvals,
                len(self.held) + self.more_held)

    @property
    def total(self) -> int:
        return sum(self.counts)


@dataclass
class _Person:
    reviews: list[ReviewRecord] = field(default_factory=list)
    approvals: list[ReviewRecord] = field(default_factory=list)
    held: list[tuple[str, str, tuple[str, ...], float, str]] = field(default_factory=list)
    more: list[int] = field(default_factory=lambda: [0, 0, 0])
    language: str | None = None  # of the newest review notice they got


class DigestBuilder:
    """Collects the pending reviews and the quarantined mail into per-person lists."""

    def __init__(self, *, audiences: Iterable[str] = AUDIENCES, max_items: int = 200,
                 domains: Iterable[str] = (), issue_link: IssueLink,
                 held_link: Callable[[str], str], language: str = "auto",
                 only: str | None = None) -> None:
        self.audiences = frozenset(audiences)
        self.max_items = max(1, int(max_items))
        self.domains = tuple(d.lower().strip(".") for d in domains)
        self.issue_link, self.held_link, self.language = issue_link, held_link, language
        self.only = only.strip().lower() if only else None
        self._people: dict[str, _Person] = {}

    def _person(self, address: str) -> _Person | None:
        person = address.strip().lower()
        if not person or (self.only is not None and person != self.only):
            return None
        return self._people.setdefault(person, _Person())

    def _keep(self, items: list, index: int, person: _Person, item: object) -> None:
        if len(items) < self.max_items:
            items.append(item)
        else:
            person.more[index] += 1

    def add_review(self, record: ReviewRecord) -> None:
        """A pending review: its sender's list, and the list of each approver who may decide
        now (not the sender when self-approval is off: that link would be refused)."""
        if record.state != "pending":
            return
        if "senders" in self.audiences:
            person = self._person(record.sender)
            if person is not None:
                self._keep(person.reviews, 0, person, record)
                person.language = person.language or record.language
        if "approvers" in self.audiences and record.kind == "approve":
            for approver in dict.fromkeys(record.approvers[:record.step + 1]):
                if not involves(record, approver)[1] or (
                        approver == record.sender and not record.self_approval):
                    continue
                person = self._person(approver)
                if person is not None:
                    self._keep(person.approvals, 1, person, record)
                    person.language = person.language or record.language

    def add_held(self, queue_id: str, sender: str, recipients: Iterable[str],
                 received_at: float, reason: str) -> None:
        """A quarantined message (not a review hold): its sender's list with every pending
        recipient, and each pending recipient's list with their own address only. Only
        addresses of our domains get one: a forged outside sender is told nothing."""
        pending = tuple(dict.fromkeys(r.strip().lower() for r in recipients if r.strip()))
        if "senders" in self.audiences and self._ours(sender):
            person = self._person(sender)
            if person is not None:
                self._keep(person.held, 2, person,
                           (queue_id, sender, pending, received_at, reason))
        if "recipients" in self.audiences:
            for address in pending:
                if address == sender.strip().lower() or not self._ours(address):
                    continue  # the sender's list has it already
                person = self._person(address)
                if person is not None:
                    self._keep(person.held, 2, person,
                               (queue_id, sender, (address,), received_at, reason))

    def _ours(self, address: str) -> bool:
        domain = address.rpartition("@")[2].strip().lower().rstrip(".")
        return bool(domain) and any(domain == d or domain.endswith("." + d)
                                    for d in self.domains)

    def digests(self, subject_of: Callable[[str], str]) -> list[Digest]:
        """One digest per person with something to list (sorted by address). Links are
        issued and subjects read here, for the shown entries only."""
        subjects: dict[str, str] = {}
        found = []
        for address in sorted(self._people):
            person = self._people[address]
            lang = self.language if self.language in LANGUAGES else (
                person.language if person.language in LANGUAGES else "ja")
            digest = Digest(address, lang, more_reviews=person.more[0],
                            more_approvals=person.more[1], more_held=person.more[2])
            for record in person.reviews:
                digest.reviews.append(ReviewEntry(record, self._links(
                    record, address, SENDER_LINKS[record.kind])))
            for record in person.approvals:
                digest.approvals.append(ReviewEntry(record, self._links(
                    record, address, APPROVER_LINKS)))
            for queue_id, sender, recipients, received_at, reason in person.held:
                if queue_id not in subjects:
                    subjects[queue_id] = subject_of(queue_id)
                digest.held.append(HeldEntry(queue_id, sender, recipients, subjects[queue_id],
                                             received_at, reason, self.held_link(queue_id)))
            if digest.total:
                found.append(digest)
        return found

    def _links(self, record: ReviewRecord, person: str,
               actions: Iterable[str]) -> dict[str, str]:
        return {action: self.issue_link(record.id, person, action, record.deadline)
                for action in actions}


# ---------------------------------------------------------------- rendering

def load_digest_template(lang: str, directory: Path | None = None) -> Template:
    """templates/digest.LANG.txt: a `Subject:` line, a blank line, the body."""
    return read_template(f"digest.{lang if lang in LANGUAGES else 'en'}.txt", PLACEHOLDERS,
                         "a digest template", directory)


class DigestRenderer:
    """Renders a digest as a complete mail (mail.build_mail: our own From, To and Subject;
    every value from a message is one line of body text)."""

    def __init__(self, from_addr: str, hostname: str, *, templates: Path | None = None,
                 tz: tzinfo | None = None) -> None:
        self.from_addr, self.hostname = from_addr, hostname
        self.templates, self.tz = templates, tz

    def render(self, digest: Digest, now: float) -> bytes:
        lang = digest.language if digest.language in LANGUAGES else "en"
        labels = _LABELS[lang]
        template = load_digest_template(lang, self.templates)
        local = datetime.fromtimestamp(now, timezone.utc).astimezone(self.tz)
        values = {
            "person": digest.person,
            "date": f"{local.year}/{local.month:02d}/{local.day:02d}",
            "count": str(digest.total),
            "reviews": self._reviews(digest, labels, lang),
            "approvals": self._approvals(digest, labels, lang),
            "held": self._held(digest, labels, lang),
        }
        body = re.sub(r"\n{3,}", "\n\n", fill(template.body, values))
        return build_mail(from_addr=self.from_addr, to_addrs=[digest.person],
                          subject=fill(template.subject, values, header=True), body=body,
                          lang=lang, hostname=self.hostname, kind="review-digest")

    def _time(self, when: float, lang: str) -> str:
        return format_time(when, lang, self.tz)

    def _reviews(self, digest: Digest, labels: Mapping[str, str], lang: str) -> str:
        if not digest.reviews:
            return ""
        lines = [labels["reviews"].format(n=digest.counts[0]), ""]
        for number, entry in enumerate(digest.reviews, 1):
            record = entry.record
            lines += _head(number, record.subject, labels)
            lines.append(f"    {labels['to']}: {_named(record.recipients, labels)}")
            if record.attachments:
                lines.append(f"    {labels['files']}: {_named(record.attachments, labels)}")
            lines.append("    " + labels[record.kind].format(
                deadline=self._time(record.deadline, lang),
                approver=one_line(record.approver or "")))
            lines += _links(entry.links, labels)
        return _finish(lines, digest.more_reviews, labels)

    def _approvals(self, digest: Digest, labels: Mapping[str, str], lang: str) -> str:
        if not digest.approvals:
            return ""
        lines = [labels["approvals"].format(n=digest.counts[1]), ""]
        for number, entry in enumerate(digest.approvals, 1):
            record = entry.record
            lines += _head(number, record.subject, labels)
            lines.append(f"    {labels['from']}: {one_line(record.sender)}")
            lines.append(f"    {labels['to']}: {_named(record.recipients, labels)}")
            if record.attachments:
                lines.append(f"    {labels['files']}: {_named(record.attachments, labels)}")
            lines.append(f"    {labels['decide_by']}: {self._time(record.deadline, lang)}")
            lines += _links(entry.links, labels)
        return _finish(lines, digest.more_approvals, labels)

    def _held(self, digest: Digest, labels: Mapping[str, str], lang: str) -> str:
        if not digest.held:
            return ""
        lines = [labels["held"].format(n=digest.counts[2]), labels["held_note"], ""]
        for number, entry in enumerate(digest.held, 1):
            lines += _head(number, entry.subject, labels)
            lines.append(f"    {labels['from']}: {one_line(entry.sender)[:320] or '<>'}")
            lines.append(f"    {labels['to']}: {_named(entry.recipients, labels)}")
            lines.append(f"    {labels['received']}: {self._time(entry.received_at, lang)}")
            lines.append(f"    {labels['reason']}: {one_line(entry.reason)[:300]}")
            lines.append(f"    {labels['view']}: <{one_line(entry.link)}>")
            lines.append("")
        return _finish(lines, digest.more_held, labels)


def _head(number: int, subject: str, labels: Mapping[str, str]) -> list[str]:
    text = one_line(subject)
    if len(text) > MAX_SUBJECT:
        text = text[:MAX_SUBJECT] + "..."
    return [f"[{number}] {text or labels['no_subject']}"]


def _named(items: Iterable[str], labels: Mapping[str, str]) -> str:
    items = tuple(items)
    shown = [one_line(item)[:320] for item in items[:MAX_NAMED]]
    if len(items) > MAX_NAMED:
        shown.append(labels["named_more"].format(n=len(items) - MAX_NAMED))
    return ", ".join(shown) if shown else labels["none"]


def _links(links: Mapping[str, str], labels: Mapping[str, str]) -> list[str]:
    names = {"send_now": "send_now", "confirm": "confirm_link", "cancel": "cancel",
             "approve": "approve_link", "reject": "reject"}
    found = [f"    {labels[names[action]]}: <{one_line(url)}>" for action, url in links.items()
             if action in names]
    return found + [""]


def _finish(lines: list[str], more: int, labels: Mapping[str, str]) -> str:
    if more:
        lines += [labels["more"].format(n=more), ""]
    return "\n".join(lines)


__all__ = ["AUDIENCES", "Digest", "DigestBuilder", "DigestRenderer", "HeldEntry",
           "ReviewEntry", "load_digest_template"]
