"""The readable bodies of a message (text/plain and text/html leaves that are not
attachments) and their neutralized replacements."""
from __future__ import annotations

import io
from dataclasses import dataclass

from milters.core.message import decode_charset
from milters.core.mime.scan import Part, Raw
from milters.core.mime.stream import NewPart, base64_lines, decoded, header_fields

from .html import html_to_text, inert_html
from .links import LinkReport, defang_text
from .note import Changes
from .settings import Treatment

MAX_BODY = 20 * 1024 * 1024  # a larger "text" part is left to the attachment rules


@dataclass
class BodyEdit:
    remove: list[Part]
    replace: list[tuple[Part, NewPart]]


def body_leaves(root: Part, attachment_ids: set[int]) -> list[tuple[Part, Part | None]]:
    """(text leaf, its parent) in document order, attachments and embedded messages left
    out (an attached message is an attachment, not a body)."""
    found: list[tuple[Part, Part | None]] = []
    stack: list[tuple[Part, Part | None]] = [(root, None)]
    while stack:
        part, parent = stack.pop()
        if part.children:
            stack.extend((child, part) for child in reversed(part.children))
            continue
        ctype = part.skeleton.get_content_type()
        if id(part.skeleton) in attachment_ids or ctype not in ("text/plain", "text/html"):
            continue
        if part.end - part.body_start <= MAX_BODY:
            found.append((part, parent))
    return found


def _text(raw: Raw, part: Part) -> str:
    data = b"".join(decoded(raw, part))
    return decode_charset(data, part.skeleton.get_content_charset())


def text_part(text: str, subtype: str, original: bytes = b"") -> NewPart:
    """A UTF-8 text part (base64 unless plain ASCII with short lines), keeping the original
    part's Content-Disposition and Content-ID so inline placement survives."""
    kept = "".join(f"{name}: {value}\r\n" for name, value in header_fields(original).items()
                   if name.lower() in ("content-disposition", "content-id"))
    body = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    if body.isascii() and all(len(line) <= 900 for line in body.split("\r\n")):
        header = (f"Content-Type: text/{subtype}; charset=\"us-ascii\"\r\n{kept}"
                  "Content-Transfer-Encoding: 7bit\r\n\r\n")
        return NewPart(header.encode("ascii"), body.encode("ascii"))
    header = (f"Content-Type: text/{subtype}; charset=\"utf-8\"\r\n{kept}"
              "Content-Transfer-Encoding: base64\r\n\r\n")
    encoded = b"".join(base64_lines(io.BytesIO(body.encode("utf-8", "surrogatepass"))))
    return NewPart(header.encode("utf-8", "surrogateescape"), encoded)


def _has_plain_sibling(parent: Part | None) -> bool:
    if parent is None or parent.skeleton.get_content_type() != "multipart/alternative":
        return False
    return any(child.skeleton.get_content_type() == "text/plain" for child in parent.children)


def neutralize_bodies(raw: Raw, leaves: list[tuple[Part, Part | None]], treatment: Treatment,
                      banner: str, changes: Changes) -> BodyEdit:
    edit = BodyEdit([], [])
    report = LinkReport()
    defang_links = treatment.links == "defang"
    for part, parent in leaves:
        header = bytes(raw[part.start:part.body_start])
        if part.skeleton.get_content_type() == "text/plain":
            if not defang_links:
                continue
            before = report.defanged
            text = defang_text(_text(raw, part), report)
            if report.defanged != before:
                edit.replace.append((part, text_part(text, "plain", header)))
            continue
        mode = treatment.html
        if mode == "keep":
            continue
        if mode == "prefer_text" and _has_plain_sibling(parent):
            edit.remove.append(part)
            changes.html = "text_kept"
        elif mode in ("prefer_text", "to_text"):
            text = html_to_text(_text(raw, part), report, defang_links)
            edit.replace.append((part, text_part(text, "plain", header)))
            changes.html = "to_text"
        else:
            markup = inert_html(_text(raw, part), report, defang_links, banner)
            edit.replace.append((part, text_part(markup, "html", header)))
            changes.html = changes.html or "sanitized"
    changes.links += report.defanged
    changes.warnings += [w for w in report.warnings if w not in changes.warnings]
    return edit
