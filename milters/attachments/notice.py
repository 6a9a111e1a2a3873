"""Password notices and the notes put into transformed messages (SaMMA's PPAP countermeasure).

The attachments milter encrypts attachments into a ZIP and mails the password separately; it
also tells the recipient, inside the transformed message, what happened to the attachments.
The texts come from templates, `templates/{kind}.{lang}.txt` (UTF-8 on disk), which a policy
may override file by file.

Japanese (ja) text goes out as ISO-2022-JP with the Windows extensions (CP50220): it is what
Outlook, Becky! and Japanese phones read everywhere, and ① ㈱ 髙 must survive. Should a value
hold a character ISO-2022-JP cannot carry at all (an emoji in a subject), that text goes out in
UTF-8 instead: a notice that names the wrong file is worse than one in a newer charset. Every
other language goes out as UTF-8.
"""
from __future__ import annotations

import base64
import math
import quopri
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from email.message import EmailMessage
from email.utils import (format_datetime, formataddr, getaddresses, make_msgid,
                         parsedate_to_datetime)
from pathlib import Path
from typing import Iterable

from milters.core.errors import ConfigError
from milters.core.eventlog import log_event
from milters.core.jis import encode_cp50220
from milters.core.shipped import shipped_dir

SHIPPED_DIR = shipped_dir(__package__, "templates")

# The placeholders each kind of template may use; anything else is a typo worth reporting.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "password": frozenset({"subject", "date", "password", "recipients", "filename", "sender"}),
    # The notice for offloaded files: the password opens the download link, not a ZIP.
    "offload-password": frozenset({"subject", "date", "password", "recipients", "filename",
                                   "sender", "expires"}),
    "encrypted-note": frozenset({"filename", "sender"}),
    "offload-note": frozenset({"links", "expires", "sender"}),
    "deleted-note": frozenset({"files"}),
}
KINDS = tuple(PLACEHOLDERS)
NOTICE_KINDS = frozenset({"password", "offload-password"})  # whole mails: a Subject line
JIS_LANGS = frozenset({"ja"})

# The language is part of a file name, so it must not be able to climb out of the directory.
_LANG = re.compile(r"[a-z]{2,3}(?:-[A-Za-z0-9]{1,8})*\Z")
# `{{` and `}}` are literal braces; `{...}` a placeholder; a lone brace is a mistake.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}\n]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SUBJECT_LINE = re.compile(r"Subject:[ \t]*(.*)\Z", re.IGNORECASE)
# C0 controls other than tab and newline: an ESC in a file name would switch the reader's
# ISO-2022-JP state, a CR would end a header.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_HALFWIDTH_KANA = re.compile(r"[\uff61-\uff9f]+")
_MSG_ID = re.compile(r"<[^<>\s]+>")
_HOSTNAME = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?)+\Z|\[[^\[\]\s]+\]\Z")
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")

# RFC 2047 section 2: an encoded word is at most 75 characters; a line holding one, 76.
_WORD_MAX = 75
_LINE_MAX = 76
_WEEKDAYS_JA = "月火水木金土日"


class TemplateError(ConfigError):
    """A notice template is missing or broken; each problem names the file and line."""


@dataclass(frozen=True)
class Template:
    kind: str
    lang: str
    subject: str  # "" for the notes, which have no Subject line
    body: str  # "\n" line ends, no trailing newline
    source: str  # the file it came from, for error messages
    body_line: int = 1  # the file line the body starts on, for error messages


# ---------------------------------------------------------------- loading and checking

def load_template(kind: str, lang: str, directory: Path | None = None) -> Template:
    """The template `kind` in `lang`: from the policy's `directory` when it has that file,
    else the shipped one. Raises TemplateError when none exists or it has problems."""
    if kind not in PLACEHOLDERS:
        raise TemplateError([f"unknown template kind {kind!r} (known: {', '.join(KINDS)})"])
    if not _LANG.match(lang):
        raise TemplateError([f"template language {lang!r} is not a language tag like 'ja'"])
    path = _find_file(f"{kind}.{lang}.txt", directory)
    template = parse_template(_read_text(path), kind, lang, str(path))
    problems = check_template(template)
    if problems:
        raise TemplateError(problems)
    return template


def _find_file(name: str, directory: Path | None) -> Path:
    if directory is not None:
        if not directory.is_dir():
            raise TemplateError([f"{directory}: template directory does not exist"])
        if (directory / name).is_file():
            return directory / name
    if (SHIPPED_DIR / name).is_file():
        return SHIPPED_DIR / name
    where = f"{directory} or {SHIPPED_DIR}" if directory is not None else str(SHIPPED_DIR)
    raise TemplateError([f"no template {name} in {where}"])


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: Windows editors put a BOM in front of UTF-8 files.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TemplateError([f"{path}: not UTF-8 (byte {exc.start}); save the template "
                             f"as UTF-8"]) from None
    except OSError as exc:
        raise TemplateError([f"{path}: cannot read: {exc.strerror}"]) from None


def parse_template(text: str, kind: str, lang: str, source: str) -> Template:
    """Split a template file into Subject and body. Only the password notice is a mail of
    its own, so only it has a `Subject:` first line (then a blank line, then the body)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    subject, start = "", 0
    if kind in NOTICE_KINDS:
        match = _SUBJECT_LINE.match(lines[0])
        if match:
            subject, start = match.group(1).strip(), 1
            if len(lines) > 1 and not lines[1].strip():
                start = 2
    body = "\n".join(lines[start:]).rstrip("\n")
    return Template(kind, lang, subject, body, source, body_line=start + 1)


def check_template(template: Template) -> list[str]:
    """Every problem of the template, each as 'FILE:LINE: what is wrong'."""
    problems: list[str] = []
    if template.kind in NOTICE_KINDS and not template.subject:
        problems.append(f"{template.source}:1: the password notice must start with a "
                        f"'Subject: ...' line, then a blank line, then the body")
    known = PLACEHOLDERS.get(template.kind, frozenset())
    if template.subject:
        problems += _check_text(template.subject, 1, template.source, known)
    problems += _check_text(template.body, template.body_line, template.source, known)
    return problems


def _check_text(text: str, first_line: int, source: str, known: frozenset[str]) -> list[str]:
    problems = []
    for match in _TOKEN.finditer(text):
        line = first_line + text.count("\n", 0, match.start())
        token, name = match.group(0), match.group(1)
        if token in ("{{", "}}"):
            continue
        if name is None:
            problems.append(f"{source}:{line}: unbalanced {token!r} (write {token * 2!r} for "
                            f"a literal brace)")
        elif name not in known:
            problems.append(f"{source}:{line}: unknown placeholder {{{name}}} (known: "
                            f"{', '.join('{%s}' % k for k in sorted(known))})")
    return problems


# ---------------------------------------------------------------- rendering

def render(template: Template, values: dict[str, str]) -> tuple[str, str]:
    """(subject, body) with the template's known placeholders filled in, in one pass so a
    value that itself contains '{password}' stays as written. Missing values become ""."""
    known = PLACEHOLDERS.get(template.kind, frozenset())
    clean = {key: _clean_value(value) for key, value in values.items() if key in known}
    subject = _substitute(template.subject, known, {k: _one_line(v) for k, v in clean.items()})
    return subject, _substitute(template.body, known, clean)


def _clean_value(value: str) -> str:
    value = str(value).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROLS.sub("", value)


def _one_line(value: str) -> str:
    return " ".join(part.strip() for part in value.split("\n") if part.strip())


def _substitute(text: str, known: frozenset[str], values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        token, name = match.group(0), match.group(1)
        if token in ("{{", "}}"):
            return token[0]
        if name is None or name not in known:
            return token  # check_template reports these; keep them visible, not silent
        value = values.get(name, "")
        # A multi-line value on an indented line keeps that indent on every line, so a
        # recipient list stays one column under its heading.
        line_start = text.rfind("\n", 0, match.start()) + 1
        indent = text[line_start:match.start()]
        if indent and not indent.strip():
            value = value.replace("\n", "\n" + indent)
        return value

    return _TOKEN.sub(replace, text)


def format_recipients(addresses: Iterable[str]) -> str:
    """One address per line for {recipients}; the template's indent applies to each line."""
    return "\n".join(address.strip() for address in addresses if address.strip())


def format_links(links: Iterable[tuple[str, str]]) -> str:
    """'name <url>' per line for {links}: the angle brackets (RFC 3986 appendix C) keep mail
    clients from gluing the following text into the link."""
    return "\n".join(f"{name} <{url}>" for name, url in links)


def format_files(files: Iterable[tuple[str, str, int]]) -> str:
    """'name (type, N KB)' per line for {files}; sizes round up, so no file shows as 0 KB."""
    return "\n".join(f"{name} ({content_type}, {math.ceil(size / 1024):,} KB)"
                     for name, content_type, size in files)


def format_date(value: str | datetime | None, lang: str, tz: tzinfo | None = None) -> str:
    """A Date header value (or a datetime) in the reader's local time: the gateway's zone
    unless `tz` is given. Unparseable text comes back unchanged rather than lost."""
    if value is None:
        return ""
    when = value if isinstance(value, datetime) else _parse_date(value)
    if when is None:
        return str(value).strip()
    local = when.astimezone(tz)
    if lang in JIS_LANGS:
        return (f"{local.year}年{local.month}月{local.day}日({_WEEKDAYS_JA[local.weekday()]}) "
                f"{local:%H:%M}")
    zone = local.tzname() or local.strftime("%z")
    return f"{local:%a}, {local.day} {local:%b %Y %H:%M} {zone}"


def _parse_date(text: str) -> datetime | None:
    try:
        return parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- charsets and encodings

@dataclass(frozen=True)
class _Encoded:
    charset: str
    transfer: str  # Content-Transfer-Encoding
    lines: list[str]  # ASCII lines, no line ends


def _to_jis(text: str) -> bytes | None:
    """CP50220 bytes, or None when some character has no ISO-2022-JP form. Half-width kana
    become full width first, as CP50220 itself does: ISO-2022-JP has no half-width kana."""
    widened = _HALFWIDTH_KANA.sub(lambda m: unicodedata.normalize("NFKC", m.group(0)), text)
    try:
        return encode_cp50220(widened)
    except UnicodeEncodeError:
        return None


def _encode_body(text: str, lang: str) -> _Encoded:
    lines = text.split("\n")
    if lang in JIS_LANGS:
        # Each line on its own, so each ends back in ASCII before the line end (RFC 1468).
        encoded = [_to_jis(line) for line in lines]
        if all(line is not None for line in encoded):
            return _Encoded("ISO-2022-JP", "7bit", [line.decode("ascii") for line in encoded
                                                    if line is not None])
    return _encode_utf8(text)


def _encode_utf8(text: str) -> _Encoded:
    """UTF-8 kept 7-bit: plain ASCII goes as is; mostly-ASCII text (English with an accented
    name) as quoted-printable, which stays readable; mostly non-ASCII text as base64, which
    is a third the size of quoted-printable there. Not 8bit: the notice may be relayed past
    servers without 8BITMIME, and a note ends up inside messages that may get signed."""
    if text.isascii() and all(len(line) <= 998 for line in text.split("\n")):
        return _Encoded("UTF-8", "7bit", text.split("\n"))
    non_ascii = sum(1 for char in text if ord(char) >= 0x80)
    if non_ascii * 4 > len(text):
        # Base64 hides the line ends, so they must be the canonical CRLF (RFC 2045 6.8),
        # the last one included, as the other encodings end the text.
        data = (text + "\n").replace("\n", "\r\n").encode("utf-8")
        return _Encoded("UTF-8", "base64", base64.encodebytes(data).decode("ascii").split())
    qp = quopri.encodestring(text.encode("utf-8")).decode("ascii")
    return _Encoded("UTF-8", "quoted-printable", qp.split("\n"))


def _encoded_words(text: str, lang: str, first_room: int) -> list[str]:
    """RFC 2047 B words for `text`: each at most 75 characters (the first one fitting in
    `first_room`), each ending on a whole character. In ISO-2022-JP each word is a complete
    sequence ending in ASCII, since a reader decodes every word on its own."""
    jis = _to_jis(text) if lang in JIS_LANGS else None
    if jis is not None:
        prefix, encode = "=?ISO-2022-JP?B?", _jis_strict
    else:
        prefix, encode = "=?UTF-8?B?", _utf8_bytes
    words: list[str] = []
    chunk = ""
    for char in text:
        room = first_room if not words else _WORD_MAX
        if chunk and _word_length(prefix, encode(chunk + char)) > room:
            words.append(_word(prefix, encode(chunk)))
            chunk = ""
        chunk += char
    if chunk:
        words.append(_word(prefix, encode(chunk)))
    return words


def _jis_strict(text: str) -> bytes:
    encoded = _to_jis(text)
    assert encoded is not None  # the whole text encoded, so every part of it does
    return encoded


def _utf8_bytes(text: str) -> bytes:
    return text.encode("utf-8")


def _word_length(prefix: str, data: bytes) -> int:
    return len(prefix) + 4 * math.ceil(len(data) / 3) + 2


def _word(prefix: str, data: bytes) -> str:
    return f"{prefix}{base64.b64encode(data).decode('ascii')}?="


def _subject_header(subject: str, lang: str) -> str:
    """The folded Subject line (CRLF inside the folds, none at the end)."""
    head = "Subject: "
    if subject.isascii() and "=?" not in subject and len(head + subject) <= 78:
        return head + subject
    if not subject:
        return head.rstrip()
    words = _encoded_words(subject, lang, first_room=_LINE_MAX - len(head))
    return head + "\r\n ".join(words)


# ---------------------------------------------------------------- the notice mail

def build_notice(*, template: Template, values: dict[str, str], from_addr: str,
                 to_addrs: list[str], original_message_id: str | None,
                 original_references: str | None, hostname: str,
                 date: datetime | None = None,
                 loop_header: tuple[str, str] = ("X-Mailmoat-Notice", "password")) -> bytes:
    """The password notice as a complete RFC 5322 message with CRLF line ends, threaded
    under the original (In-Reply-To, References) and marked auto-generated (RFC 3834).
    Send it with a null envelope sender, as RFC 3834 section 3.3 asks."""
    if not to_addrs:
        raise ValueError("a notice needs at least one recipient")
    if not _HOSTNAME.match(hostname):
        raise ValueError(f"hostname {hostname!r} cannot go into a Message-ID")
    subject, body = render(template, values)
    encoded = _encode_body(body, template.lang)
    headers = [
        "From: " + _address_list([from_addr]),
        "To: " + _address_list(to_addrs),
        _subject_header(subject, template.lang),
        "Date: " + format_datetime(_aware(date)),
        "Message-ID: " + make_msgid(domain=hostname),
        *_thread_headers(original_message_id, original_references),
        "Auto-Submitted: auto-generated",
        _loop_header(loop_header),
        "MIME-Version: 1.0",
        f"Content-Type: text/plain; charset={encoded.charset}",
        f"Content-Transfer-Encoding: {encoded.transfer}",
    ]
    text = "\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(encoded.lines) + "\r\n"
    return text.encode("ascii")


def _aware(date: datetime | None) -> datetime:
    """The Date header's time: now if not given; a naive time is taken as local time."""
    if date is None:
        return datetime.now(timezone.utc).astimezone()
    return date if date.tzinfo is not None else date.astimezone()


def _address_list(addresses: list[str]) -> str:
    """Addresses as a header value, display names RFC 2047-encoded, folded one per line
    when long. Parsing first drops any CR/LF smuggled into an address."""
    pairs = getaddresses([_one_line(_clean_value(address)) for address in addresses])
    formatted = [formataddr((name, addr), charset="utf-8") for name, addr in pairs if addr]
    if not formatted:
        raise ValueError(f"no usable address in {list(addresses)!r}")
    joined = ", ".join(formatted)
    return joined if len(joined) <= 70 else ",\r\n ".join(formatted)


def _thread_headers(message_id: str | None, references: str | None) -> list[str]:
    """In-Reply-To and References per RFC 5322 section 3.6.4: the parent's Message-ID, and
    the parent's References followed by it. Neither when the parent has nothing to cite."""
    text = (message_id or "").strip()
    cited = _MSG_ID.findall(text)[:1] or ([f"<{text}>"] if _bare_id(text) else [])
    listed = _MSG_ID.findall(references or "")
    parent, chain = _ascii_ids(cited), _ascii_ids(listed)
    chain += parent
    if len(chain) < len(cited) + len(listed):
        log_event("notice_id_dropped", milter="attachments",
                  count=len(cited) + len(listed) - len(chain), why="not ASCII")
    headers: list[str] = []
    if parent:
        headers.append("In-Reply-To: " + parent[0])
    if chain:
        headers.append("References: " + _fold_ids(chain))
    return headers


def _ascii_ids(ids: list[str]) -> list[str]:
    """The identifiers that are ASCII. A non-ASCII one (`<x@example.срб>`, RFC 6532) may
    only travel in a message sent with SMTPUTF8, and the notice is plain ASCII mail sent
    without it: the identifier is left out (threading is a convenience; the notice is
    not), and logged by the caller."""
    return [one for one in ids if one.isascii()]


def ascii_or_empty(value: str | None) -> str:
    """A header value we reuse (a Message-ID as a folder name), or "" when not ASCII."""
    text = (value or "").strip()
    return text if text.isascii() else ""


def _bare_id(text: str) -> bool:
    """A Message-ID given without its angle brackets ('abc@example.jp')."""
    return bool(text) and "@" in text and not re.search(r"[\s<>]", text)


def _fold_ids(ids: list[str]) -> str:
    lines = [ids[0]]
    for msg_id in ids[1:]:
        # "References: " is 12 characters on the first line, one space on the others.
        width = len(lines[-1]) + (12 if len(lines) == 1 else 1)
        if width + 1 + len(msg_id) > 78:
            lines.append(msg_id)
        else:
            lines[-1] += " " + msg_id
    return "\r\n ".join(lines)


def _loop_header(header: tuple[str, str]) -> str:
    name, value = header
    if not _FIELD_NAME.match(name):
        raise ValueError(f"{name!r} is not a header field name")
    return f"{name}: {_one_line(_clean_value(value))}"


# ---------------------------------------------------------------- the note part

def note_part(template: Template, values: dict[str, str]) -> EmailMessage:
    """The note as an inline text/plain part, in the same charset and transfer encoding as a
    notice in that language, ready to go into the transformed message."""
    _, body = render(template, values)
    encoded = _encode_body(body, template.lang)
    part = EmailMessage()
    part["Content-Type"] = f"text/plain; charset={encoded.charset}"
    part["Content-Transfer-Encoding"] = encoded.transfer
    part["Content-Disposition"] = "inline"
    # "\n" inside the model: the generator writes the policy's line end (CRLF on the wire).
    part.set_payload("\n".join(encoded.lines) + "\n")
    return part


__all__ = ["KINDS", "PLACEHOLDERS", "SHIPPED_DIR", "Template", "TemplateError",
           "build_notice", "check_template", "format_date", "format_files", "format_links",
           "format_recipients", "load_template", "note_part", "parse_template", "render"]
