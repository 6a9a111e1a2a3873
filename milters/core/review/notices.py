"""The review notices: what the sender and the approvers get, and the result notices.

    notices = ReviewNotices(from_addr="mailmoat-review@example.jp", hostname="mx.example.jp")
    raw = notices.render_for_sender(record, {"send_now": URL, "cancel": URL}, "ja")
    raw = notices.render_for_approver(record, "boss@example.jp", {"approve": URL,
                                      "reject": URL}, "ja")
    raw = notices.render_result(record, "ja")      # rejected (with the reason), cancelled,
                                                   # expired
Texts come from templates/{kind}.{lang}.txt (UTF-8; a first `Subject:` line, a blank line,
the body with {placeholders}); a directory of one's own may override them file by file.
Each render gives a complete message (mail.build_mail) to re-inject with a null sender.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError, ReviewError
from ..shipped import shipped_dir
from .mail import build_mail, clean, one_line
from .record import ReviewRecord

SHIPPED_DIR = shipped_dir(__package__, "templates")
LANGUAGES = ("ja", "en")
FALLBACK = "en"  # a language we have no template for gets English, never no notice
# The notice kinds: the sender's first notice per review kind, the approver's, the results.
SENDER_KINDS = {"delay": "delay", "confirm": "confirm", "approve": "pending"}
RESULT_KINDS = {"rejected": "rejected", "cancelled": "cancelled", "expired": "expired"}
KINDS = ("delay", "confirm", "pending", "approve", "rejected", "cancelled", "expired")
PLACEHOLDERS = frozenset({
    "subject", "sender", "recipients", "outside", "attachments", "size", "deadline",
    "approver", "reason", "decided_by", "send_now_link", "cancel_link", "confirm_link",
    "approve_link", "reject_link"})
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}\n]*)\}|[{}]")
_SUBJECT_LINE = re.compile(r"Subject:[ \t]*(.*)\Z", re.IGNORECASE)
_WEEKDAYS_JA = "月火水木金土日"
MAX_LISTED = 50  # recipients or files named in a notice; the rest as "... and N more"


class TemplateError(ConfigError):
    """A review notice template is missing or broken (each problem names file and line)."""


@dataclass(frozen=True)
class Template:
    subject: str
    body: str
    source: str


def load_template(kind: str, lang: str, directory: Path | None = None) -> Template:
    if kind not in KINDS:
        raise TemplateError([f"unknown review notice {kind!r} (known: {', '.join(KINDS)})"])
    return read_template(f"{kind}.{lang if lang in LANGUAGES else FALLBACK}.txt",
                         PLACEHOLDERS, "a review notice", directory)


def read_template(name: str, placeholders: frozenset[str], what: str,
                  directory: Path | None = None) -> Template:
    """templates/NAME, or the admin's copy of it in `directory`: a `Subject:` line, a blank
    line, the body. An unknown placeholder or a lone brace is refused with its file."""
    path = directory / name if directory is not None and (directory / name).is_file() \
        else SHIPPED_DIR / name
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError([f"{path}: cannot read it as UTF-8 text: {exc}"]) from None
    lines = text.replace("\r\n", "\n").split("\n")
    match = _SUBJECT_LINE.match(lines[0])
    if not match:
        raise TemplateError([f"{path}:1: {what} starts with a 'Subject: ...' line"])
    start = 2 if len(lines) > 1 and not lines[1].strip() else 1
    template = Template(match.group(1).strip(), "\n".join(lines[start:]).rstrip("\n"),
                        str(path))
    problems = [f"{path}: unknown placeholder {{{m.group(1)}}}" if m.group(1) is not None
                else f"{path}: unbalanced {m.group(0)!r} (write it twice for a brace)"
                for m in _TOKEN.finditer(template.subject + "\n" + template.body)
                if m.group(0) not in ("{{", "}}") and m.group(1) not in placeholders]
    if problems:
        raise TemplateError(problems)
    return template


def fill(text: str, values: Mapping[str, str], *, header: bool = False) -> str:
    """The text with its placeholders filled in one pass (a value holding '{reason}' stays
    as written); a multi-line value on an indented line keeps the indent on every line."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        value = clean(values.get(match.group(1) or "", ""))
        if header:
            return one_line(value)
        line_start = text.rfind("\n", 0, match.start()) + 1
        indent = text[line_start:match.start()]
        return value.replace("\n", "\n" + indent) if indent and not indent.strip() else value
    return _TOKEN.sub(replace, text)


def format_time(when: float, lang: str, tz: tzinfo | None = None) -> str:
    local = datetime.fromtimestamp(when, timezone.utc).astimezone(tz)
    if lang == "ja":
        return (f"{local.year}年{local.month}月{local.day}日"
                f"({_WEEKDAYS_JA[local.weekday()]}) {local:%H:%M}")
    return f"{local:%a}, {local.day} {local:%b %Y %H:%M} {local.tzname() or ''}".rstrip()


def format_size(size: int) -> str:
    return f"{math.ceil(size / 1024):,} KB"


def _listed(items: tuple[str, ...], lang: str, none: str) -> str:
    shown = [one_line(item) for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        more = len(items) - MAX_LISTED
        shown.append(f"... 他 {more} 件" if lang == "ja" else f"... and {more} more")
    return "\n".join(shown) if shown else none


class ReviewNotices:
    """Renders the review notices of one gateway: its From address, its hostname (for
    Message-IDs), its time zone (for "sent at 15:04"), optionally its own templates."""

    def __init__(self, from_addr: str, hostname: str, *, templates: Path | None = None,
                 tz: tzinfo | None = None) -> None:
        self.from_addr, self.hostname = from_addr, hostname
        self.templates, self.tz = templates, tz

    def render_for_sender(self, record: ReviewRecord, links: Mapping[str, str],
                          language: str) -> bytes:
        """The sender's notice: delay (send now / cancel), confirm (the outside recipients;
        confirm / cancel) or, for an approval, that it waits (cancel)."""
        return self._render(SENDER_KINDS[record.kind], record, [record.sender], links,
                            language)

    def render_for_approver(self, record: ReviewRecord, approver: str,
                            links: Mapping[str, str], language: str) -> bytes:
        """An approver's notice: the summary and the approve / reject links."""
        return self._render("approve", record, [approver], links, language)

    def render_result(self, record: ReviewRecord, language: str | None = None) -> bytes:
        """The sender's notice that the message will not go: rejected (with the approver's
        reason), cancelled, or expired. ReviewError for any other state."""
        kind = RESULT_KINDS.get(record.state)
        if kind is None:
            raise ReviewError(f"review {record.id} is {record.state}: no result notice")
        return self._render(kind, record, [record.sender], {}, language or record.language)

    def _render(self, kind: str, record: ReviewRecord, to: list[str],
                links: Mapping[str, str], language: str) -> bytes:
        lang = language if language in LANGUAGES else FALLBACK
        template = load_template(kind, lang, self.templates)
        values = self._values(record, links, lang)
        return build_mail(from_addr=self.from_addr, to_addrs=to,
                          subject=fill(template.subject, values, header=True),
                          body=fill(template.body, values), lang=lang,
                          hostname=self.hostname, in_reply_to=record.message_id,
                          kind=f"review-{kind}")

    def _values(self, record: ReviewRecord, links: Mapping[str, str],
                lang: str) -> dict[str, str]:
        last = record.decisions[-1] if record.decisions else None
        none = "(なし)" if lang == "ja" else "(none)"
        values = {
            "subject": one_line(record.subject) or none,
            "sender": record.sender,
            "recipients": _listed(record.recipients, lang, none),
            "outside": _listed(record.outside or record.recipients, lang, none),
            "attachments": _listed(record.attachments, lang, none),
            "size": format_size(record.size),
            "deadline": format_time(record.deadline, lang, self.tz),
            "approver": record.approver or "",
            "reason": (last.reason if last and last.reason else none),
            "decided_by": last.who if last else "",
        }
        for action in ("send_now", "cancel", "confirm", "approve", "reject"):
            # A link is one line of URL text: nothing in it may start a new line.
            values[f"{action}_link"] = one_line(links.get(action, ""))
        return values


__all__ = ["KINDS", "LANGUAGES", "PLACEHOLDERS", "ReviewNotices", "Template", "read_template",
           "TemplateError", "fill", "format_time", "load_template"]
