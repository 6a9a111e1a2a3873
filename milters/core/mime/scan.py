"""The MIME structure of a message as byte ranges of its raw form, without copying the parts.

The stdlib parser keeps every part's body as a string: a 20 MB attachment costs its encoded
size again, and the decoded data a third time. Here the raw message (bytes, or an mmap of
the spooled message) is only searched: each part is a range, and a skeleton EmailMessage
tree (headers, plus the bodies of small parts) lets parts.find_attachments decide which
parts are attachments exactly as it does on a full parse.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from typing import Union

import mmap

Raw = Union[bytes, mmap.mmap]
# Bodies up to this size go into the skeleton: the text parts find_attachments reads (the
# HTML that refers to inline images, an embedded message's Subject) are small.
SKELETON_BODY = 256 * 1024
MAX_DEPTH = 50  # deeper multiparts are a parser bomb, not mail: left as one opaque part
_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"]*)"|([^\s;]+))', re.IGNORECASE)
_HEADERS = BytesHeaderParser(policy=email_policy.default)


@dataclass
class Part:
    start: int  # where the part (its header section) begins in the raw message
    body_start: int
    end: int  # where its body ends (the CRLF before the next delimiter excluded)
    skeleton: EmailMessage
    children: list["Part"] = field(default_factory=list)
    close_at: int | None = None  # a multipart: where its closing delimiter line begins
    boundary: bytes = b""
    delimiter_at: int = 0  # where the delimiter line before this part begins


def header_end(raw: Raw, start: int, end: int) -> int:
    """Offset of the body: after the blank line ending the header section (a part may
    start with the blank line: no headers at all)."""
    if raw[start:start + 2] == b"\r\n":
        return start + 2
    found = raw.find(b"\r\n\r\n", start, end)
    return end if found < 0 else found + 4


def _skeleton(raw: Raw, start: int, body_start: int, end: int) -> EmailMessage:
    header = bytes(raw[start:body_start])
    skeleton = _HEADERS.parsebytes(header if header.endswith(b"\r\n\r\n") else header
                                   + b"\r\n")
    assert isinstance(skeleton, EmailMessage)
    skeleton.set_payload(bytes(raw[body_start:min(end, body_start + SKELETON_BODY)])
                         .decode("ascii", "surrogateescape")
                         if end - body_start <= SKELETON_BODY
                         or skeleton.get_content_maintype() == "message" else "")
    return skeleton


def _boundary(header: bytes) -> bytes | None:
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", header)
    ctype = re.search(rb"(?im)^content-type:[ \t]*multipart/[^\r\n]*", unfolded)
    if ctype is None:
        return None
    found = _BOUNDARY.search(ctype.group(0))
    if found is None:
        return None
    value = found.group(1) if found.group(1) is not None else found.group(2)
    return value or None


def _delimiters(raw: Raw, boundary: bytes, start: int, end: int) -> list[tuple[int, int, bool]]:
    """(line start, line end incl. CRLF, closing?) of each delimiter line in [start, end)."""
    dash = b"--" + boundary
    found = []
    at = start
    while at < end:
        hit = _find(raw, dash, at, end)
        if hit < 0:
            break
        line_end = raw.find(b"\r\n", hit, end)
        line_end = end if line_end < 0 else line_end + 2
        at_line_start = hit == start or raw[hit - 2:hit] == b"\r\n"
        rest = bytes(raw[hit + len(dash):line_end]).rstrip(b"\r\n")
        closing = rest.startswith(b"--")
        if at_line_start and not (rest[2:] if closing else rest).strip(b" \t"):
            found.append((hit, line_end, closing))
            if closing:
                break
        at = line_end
    return found


WINDOW = 4 * 1024 * 1024


def _find(raw: Raw, needle: bytes, start: int, end: int) -> int:
    """raw.find(), in windows whose pages are let go of once searched (an mmap'd 30 MB
    attachment would otherwise be resident all at once)."""
    if not isinstance(raw, mmap.mmap):
        return raw.find(needle, start, end)
    at = start
    while at < end:
        stop = min(end, at + WINDOW + len(needle))
        hit = raw.find(needle, at, stop)
        if hit >= 0:
            return hit
        release(raw, at, min(end, at + WINDOW))
        at += WINDOW
    return -1


def _fill(raw: Raw, part: Part, depth: int) -> None:
    boundary = _boundary(bytes(raw[part.start:part.body_start]))
    if boundary is None or depth >= MAX_DEPTH:
        return
    part.boundary = boundary
    lines = _delimiters(raw, boundary, part.body_start, part.end)
    for (line_start, line_end, closing), following in zip(lines, lines[1:] + [(part.end, part.end,
                                                                        True)]):
        if closing:
            part.close_at = lines[-1][0] if lines[-1][2] else None
            break
        next_start = following[0]
        end = next_start - 2 if raw[next_start - 2:next_start] == b"\r\n" else next_start
        end = max(end, line_end)
        body_start = header_end(raw, line_end, end)
        child = Part(line_end, body_start, end, _skeleton(raw, line_end, body_start, end),
                     delimiter_at=line_start)
        part.children.append(child)
        _fill(raw, child, depth + 1)
    part.skeleton.set_payload([child.skeleton for child in part.children])


def scan(raw: Raw) -> Part:
    """The whole message: its header section, and its parts as ranges with skeletons."""
    end = len(raw)
    body_start = header_end(raw, 0, end)
    root = Part(0, body_start, end, _skeleton(raw, 0, body_start, end))
    _fill(raw, root, 0)
    release(raw, 0, end)
    return root


def release(raw: Raw, start: int, end: int) -> None:
    """Let go of the pages of an mmap'd message once read: searching or copying a 30 MB
    message would otherwise leave all of it resident, counted against the milter's memory
    (the data stays in the page cache, a later read maps it back)."""
    if not isinstance(raw, mmap.mmap) or end <= start:
        return
    page = mmap.PAGESIZE
    first = start - start % page
    last = min(len(raw), end + (-end % page))
    if last > first:
        raw.madvise(mmap.MADV_DONTNEED, first, last - first)


def parts_by_skeleton(root: Part) -> dict[int, Part]:
    """id(skeleton) -> Part, for mapping find_attachments' answers back to ranges."""
    found: dict[int, Part] = {}
    stack = [root]
    while stack:
        part = stack.pop()
        found[id(part.skeleton)] = part
        stack.extend(part.children)
    return found
