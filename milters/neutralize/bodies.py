"""The readable parts of a message and their neutralized replacements: text/* leaves that
are not attachments (and text files kept as they are), message/* reports (delivery status,
feedback reports: their fields carry URLs, `Reported-Uri:`), and embedded messages, read
again part by part to any depth (bounded).

A part that cannot be read (too large to check, a multipart nested too deep to split, a
message/external-body pointing elsewhere, a message/partial fragment) is never passed as it
came: it is replaced by a short text saying it was removed and why.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

from milters.core.mime.scan import Part, Raw, scan
from milters.core.mime.stream import (NewPart, base64_lines, copy_header, decoded,
                                      header_fields, rebuild)

from .html import html_to_text, inert_html
from .links import LinkReport, defang_text
from .note import Changes
from .settings import Treatment
from .textview import read_text

MAX_BODY = 20 * 1024 * 1024  # a larger text part is not read: it is removed
MAX_NESTED = 8  # embedded messages inside embedded messages read this deep
EMBEDDED = frozenset({"message/rfc822", "message/global", "message/news"})
# Not text we can read: a pointer to content elsewhere, or a fragment of a message.
UNREADABLE = frozenset({"message/external-body", "message/partial"})
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass
class BodyEdit:
    remove: list[Part]
    replace: list[tuple[Part, NewPart]]


def readable(ctype: str) -> bool:
    """A part a reader sees as text (a client shows it in line and links what it finds)."""
    return ctype.startswith(("text/", "message/"))


def body_leaves(root: Part, attachment_ids: set[int]) -> list[tuple[Part, Part | None]]:
    """(leaf, its parent) in document order for every text or message/* leaf that is not
    an attachment, and every multipart that could not be split (nothing in it was read)."""
    found: list[tuple[Part, Part | None]] = []
    stack: list[tuple[Part, Part | None]] = [(root, None)]
    while stack:
        part, parent = stack.pop()
        if part.children:
            stack.extend((child, part) for child in reversed(part.children))
            continue
        ctype = part.skeleton.get_content_type()
        if id(part.skeleton) in attachment_ids:
            continue
        if readable(ctype) or ctype.startswith("multipart/"):
            found.append((part, parent))
    return found


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")


def text_part(text: str, subtype: str, original: bytes = b"") -> NewPart:
    """A UTF-8 text part (base64 unless plain ASCII with short lines), keeping the original
    part's Content-Disposition and Content-ID so inline placement survives."""
    kept = "".join(f"{name}: {value}\r\n" for name, value in header_fields(original).items()
                   if name.lower() in ("content-disposition", "content-id"))
    body = _crlf(text)
    if body.isascii() and all(len(line) <= 900 for line in body.split("\r\n")):
        header = (f"Content-Type: text/{subtype}; charset=\"us-ascii\"\r\n{kept}"
                  "Content-Transfer-Encoding: 7bit\r\n\r\n")
        return NewPart(header.encode("utf-8", "surrogateescape"), body.encode("ascii"))
    header = (f"Content-Type: text/{subtype}; charset=\"utf-8\"\r\n{kept}"
              "Content-Transfer-Encoding: base64\r\n\r\n")
    encoded = b"".join(base64_lines(io.BytesIO(body.encode("utf-8", "surrogatepass"))))
    return NewPart(header.encode("utf-8", "surrogateescape"), encoded)


def _same_type(original: bytes, body: bytes) -> NewPart:
    """A message/* part with a new body and its own header fields, but a transfer encoding
    that says what the body now is (message/* may only be 7bit or 8bit: RFC 2046 5.2)."""
    fields = header_fields(original)
    kept = "".join(f"{name}: {value}\r\n" for name, value in fields.items()
                   if name.lower() not in ("content-transfer-encoding", "content-length"))
    cte = "7bit" if body.isascii() else "8bit"
    header = f"{kept}Content-Transfer-Encoding: {cte}\r\n\r\n"
    return NewPart(header.encode("utf-8", "surrogateescape"), body)


def _removed(part: Part, why: str, changes: Changes) -> NewPart:
    what = f"a {part.skeleton.get_content_type()} part"
    changes.dropped.append((what, why))
    return text_part(f"mailmoat removed {what} here: {why}.\n", "plain")


def neutralize_bodies(raw: Raw, leaves: list[tuple[Part, Part | None]], treatment: Treatment,
                      banner: str, changes: Changes, depth: int = 0) -> BodyEdit:
    edit = BodyEdit([], [])
    report = LinkReport()
    for part, parent in leaves:
        ctype = part.skeleton.get_content_type()
        if ctype.startswith("multipart/"):
            if bytes(raw[part.body_start:part.end]).strip():
                edit.replace.append((part, _removed(part, "it is nested too deep to be read",
                                                    changes)))
        elif part.end - part.body_start > MAX_BODY:
            edit.replace.append((part, _removed(part, f"it is larger than {MAX_BODY} bytes",
                                                changes)))
        elif ctype in UNREADABLE:
            edit.replace.append((part, _removed(part, "its content is not in this message "
                                                      "or not whole", changes)))
        elif ctype in EMBEDDED:
            new = _embedded(raw, part, treatment, banner, changes, depth)
            if new is not None:
                edit.replace.append((part, new))
        elif ctype == "text/html":
            _html(raw, part, parent, treatment, banner, changes, report, edit)
        else:
            _plain(raw, part, treatment, changes, report, edit)
    changes.links += report.defanged
    changes.warnings += [w for w in report.warnings if w not in changes.warnings]
    return edit


def _plain(raw: Raw, part: Part, treatment: Treatment, changes: Changes, report: LinkReport,
           edit: BodyEdit) -> None:
    """Plain text and message/* reports: every URL defanged; a reading in doubt rewritten
    from every way a client may read it."""
    view = read_text(raw, part)
    if treatment.links != "defang":
        return
    before = report.defanged
    text = defang_text(view.text, report)
    found = report.defanged - before
    for other in view.others:
        extra = LinkReport()
        shown = defang_text(other, extra)
        if extra.defanged > found:  # a client reading it this way would find more links
            text += "\n\n-- the same part as other mail programs may show it --\n" + shown
            report.defanged += extra.defanged
            found = extra.defanged
    if view.doubt:
        changes.warn(f"a text part could not be read with certainty ({view.doubt}); it was "
                     "rewritten with its links disabled")
    elif report.defanged == before:
        return
    header = bytes(raw[part.start:part.body_start])
    ctype = part.skeleton.get_content_type()
    if ctype.startswith("message/"):
        edit.replace.append((part, _same_type(header, _crlf(text).encode("utf-8",
                                                                          "surrogatepass"))))
    else:
        edit.replace.append((part, text_part(text, ctype.split("/", 1)[1], header)))


def _has_plain_sibling(parent: Part | None) -> bool:
    if parent is None or parent.skeleton.get_content_type() != "multipart/alternative":
        return False
    return any(child.skeleton.get_content_type() == "text/plain" for child in parent.children)


def _html(raw: Raw, part: Part, parent: Part | None, treatment: Treatment, banner: str,
          changes: Changes, report: LinkReport, edit: BodyEdit) -> None:
    mode = treatment.html
    if mode == "keep":
        return
    header = bytes(raw[part.start:part.body_start])
    defang_links = treatment.links == "defang"
    if mode == "prefer_text" and _has_plain_sibling(parent):
        edit.remove.append(part)
        changes.html = "text_kept"
    elif mode in ("prefer_text", "to_text"):
        text = html_to_text(read_text(raw, part).text, report, defang_links)
        edit.replace.append((part, text_part(text, "plain", header)))
        changes.html = "to_text"
    else:
        markup = inert_html(read_text(raw, part).text, report, defang_links, banner)
        edit.replace.append((part, text_part(markup, "html", header)))
        changes.html = changes.html or "sanitized"


def _embedded(raw: Raw, part: Part, treatment: Treatment, banner: str, changes: Changes,
              depth: int) -> NewPart | None:
    """An embedded message with its own readable parts neutralized; None if unchanged."""
    if depth >= MAX_NESTED:
        return _removed(part, f"messages inside messages are read {MAX_NESTED} deep", changes)
    header = bytes(raw[part.start:part.body_start])
    # scan reads CRLF lines; an embedded message's own line ends are not ours to trust.
    inner = _LINE_END.sub(b"\r\n", b"".join(decoded(raw, part)))
    root = scan(inner)
    done = neutralize_bodies(inner, body_leaves(root, set()), treatment, banner, changes,
                             depth + 1)
    if not done.remove and not done.replace:
        return None
    rebuilt = rebuild(inner, root, done.remove, [], done.replace)
    body = copy_header(inner, rebuilt.mime_headers, []) + rebuilt.body.read()
    return _same_type(header, body)
