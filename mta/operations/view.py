"""One queued message as the console and `queue show` present it, within bounded work.

Only the first MAX_READ bytes of the spool file are parsed, at most MAX_PARTS parts are
visited (MAX_DEPTH levels deep), MAX_HEADERS headers and MAX_TEXT characters of text are
kept: a 50 MB message or one of 10,000 parts costs the same as a large ordinary one, and
the view says what it left out. HTML parts come back as plain text (html_text.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from typing import Any

from .decode import decode_bytes, decode_header, unescape_raw
from .html_text import html_to_text

MAX_READ = 8 * 1024 * 1024
MAX_PARTS = 500
MAX_DEPTH = 20
MAX_HEADERS = 200
MAX_TEXT = 200_000  # characters of text shown, all parts together
MAX_ATTACHMENTS = 500


@dataclass(frozen=True)
class AttachmentInfo:
    name: str
    content_type: str
    size: int  # decoded bytes (of what was read, when the message was cut)


@dataclass(frozen=True)
class TextPart:
    content_type: str  # text/plain, or text/html shown as text
    text: str
    from_html: bool
    truncated: bool


@dataclass(frozen=True)
class MessageView:
    queue_id: str
    envelope: dict[str, Any]
    size: int
    held: bool
    hold_reason: str | None
    why: str | None  # the milter or rule that held it, from the audit story
    subject: str
    from_: str
    message_id: str
    headers: list[tuple[str, str]]
    texts: list[TextPart]
    attachments: list[AttachmentInfo]
    auth_results: list[str]
    truncated: bool
    notes: list[str] = field(default_factory=list)  # what was left out, in words


@dataclass
class _Walk:
    texts: list[TextPart] = field(default_factory=list)
    attachments: list[AttachmentInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    text_left: int = MAX_TEXT
    parts: int = 0
    cut: bool = False  # something was left out

    def leave_out(self, note: str) -> None:
        self.cut = True
        self.notes.append(note)


def parse_head(data: bytes) -> Message:
    return BytesParser(policy=compat32).parsebytes(data, headersonly=True)


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - broken transfer encoding: show nothing of it
        return b""
    return data if isinstance(data, bytes) else b""


def _file_name(part: Message) -> str:
    # Raw 8-bit parameters (filename="生.bin") are made text first: compat32 would turn
    # them into replacement characters before the parameter is even parsed.
    params = Message()
    for key, value in part.raw_items():
        if key.lower() in ("content-disposition", "content-type"):
            params[key] = unescape_raw(str(value))
    try:
        raw = params.get_filename() or params.get_param("name") or ""
    except Exception:  # noqa: BLE001 - a broken RFC 2231 parameter
        raw = ""
    if isinstance(raw, tuple):  # an RFC 2231 value compat32 did not join
        raw = decode_bytes(str(raw[2]).encode("latin-1", "replace"), raw[0])
    return decode_header(raw, limit=255)


def _leaf(part: Message, walk: _Walk) -> None:
    ctype = part.get_content_type()
    name = _file_name(part)
    disposition = str(part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
    if ctype in ("text/plain", "text/html") and not name and disposition != "attachment":
        if walk.text_left <= 0:
            walk.leave_out("more text parts not shown")
            return
        text = decode_bytes(_payload(part), part.get_content_charset())
        if ctype == "text/html":
            text = html_to_text(text)
        cut = len(text) > walk.text_left
        if cut:
            walk.leave_out(f"text shown up to {MAX_TEXT} characters")
        walk.texts.append(TextPart(ctype, text[:walk.text_left], ctype == "text/html", cut))
        walk.text_left -= len(text)
        return
    if len(walk.attachments) >= MAX_ATTACHMENTS:
        walk.leave_out(f"only the first {MAX_ATTACHMENTS} attachments are listed")
    else:
        walk.attachments.append(AttachmentInfo(name or "(no name)", ctype,
                                               len(_payload(part))))


def _walk(root: Message, walk: _Walk) -> None:
    stack: list[tuple[Message, int]] = [(root, 0)]
    while stack:
        part, depth = stack.pop()
        walk.parts += 1
        if walk.parts > MAX_PARTS:
            walk.leave_out(f"only the first {MAX_PARTS} MIME parts are shown")
            return
        children = part.get_payload() if part.is_multipart() else None
        if children is None:
            _leaf(part, walk)
        elif depth >= MAX_DEPTH:
            walk.leave_out(f"parts nested deeper than {MAX_DEPTH} levels are not shown")
        elif isinstance(children, list):
            stack.extend((child, depth + 1) for child in reversed(children)
                         if isinstance(child, Message))


def build_view(queue_id: str, envelope: dict[str, Any], data: bytes, size: int,
               why: str | None) -> MessageView:
    """`data`: the first MAX_READ bytes (or all) of a message of `size` bytes."""
    message = BytesParser(policy=compat32).parsebytes(data)
    walk = _Walk()
    if size > len(data):
        walk.leave_out(f"only the first {len(data)} of {size} bytes were read")
    if message.defects and size <= len(data):  # a cut message always looks broken
        walk.notes.append("the message's MIME structure is broken: "
                          + ", ".join(sorted({type(d).__name__ for d in message.defects}))[:300])
    headers = [(decode_header(name, 100), decode_header(value))
               for name, value in message.items()[:MAX_HEADERS]]
    if len(message.items()) > MAX_HEADERS:
        walk.leave_out(f"only the first {MAX_HEADERS} header fields are shown")
    _walk(message, walk)
    hold_reason = envelope.get("hold_reason")
    return MessageView(
        queue_id=queue_id, envelope=envelope, size=size, held=hold_reason is not None,
        hold_reason=hold_reason, why=why,
        subject=decode_header(message.get("Subject")),
        from_=decode_header(message.get("From")),
        message_id=decode_header(message.get("Message-ID"), 998),
        headers=headers, texts=walk.texts, attachments=walk.attachments,
        auth_results=[decode_header(v) for v in (message.get_all("Authentication-Results")
                                                 or [])][:20],
        truncated=walk.cut, notes=list(dict.fromkeys(walk.notes)))
