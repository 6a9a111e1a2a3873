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
# Deeper multiparts are a parser bomb, not mail: left as one opaque part, which is then an
# attachment as a whole (fail closed: its files never leave in the clear).
MAX_DEPTH = 100
_HEADERS = BytesHeaderParser(policy=email_policy.default)
# A header field's first line: a name of printable ASCII without ':', then ':'.
_FIELD_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
_NAME_BYTES = re.compile(rb"[^!-9;-~]")
# A line of base64 text: where a part's headers ran straight into its base64 body.
_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/]{2,}={0,2}")
_BASE64_CTE = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:[ \t]*base64[ \t]*\r?$")
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\Z)")
BOM = b"\xef\xbb\xbf"
# Read no more of one header field than Postfix keeps (header_size_limit, 102400): the
# stdlib's header parser is quadratic in the lines of one folded field.
HEADER_SIZE_LIMIT = 102400
OPAQUE = "_mailmoat_opaque"  # a skeleton attribute: a multipart left unsplit (too deep)


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
    start with the blank line: no headers at all). Headers that run straight into a base64
    body (no blank line, and sent) end at the first line of base64 text that is not a
    header field, when the part declared base64."""
    if raw[start:start + 2] == b"\r\n":
        return start + 2
    found = raw.find(b"\r\n\r\n", start, end)
    blank = end if found < 0 else found + 4
    return _base64_start(raw, start, blank) or blank


def _base64_start(raw: Raw, start: int, stop: int) -> int | None:
    """Where base64 text begins inside what looks like a header section, or None."""
    if _BASE64_CTE.search(raw, start, stop) is None:  # at C speed: most parts stop here
        return None
    at = start
    declared = False
    while at < stop:
        line = _LINE.match(raw, at, stop)
        if line is None or line.end() == at:
            return None
        text = line.group(0).rstrip(b"\r\n")
        if declared and len(text) % 4 == 0 and _BASE64_LINE.fullmatch(text):
            return at
        declared = declared or bool(_BASE64_CTE.match(text))
        at = line.end()
    return None


def header_bytes(header: bytes, root: bool = False) -> bytes:
    """A header section made readable for the stdlib parser, the way mail clients read it:
    a UTF-8 BOM before the first field dropped, bytes that cannot be in a field name
    replaced by "_" (the stdlib ends the header section at such a name, losing every field
    after it), a line that is not a field read as a continuation of the field before it
    (the stdlib would end the headers there too)."""
    if root and header.startswith(BOM):
        header = header[len(BOM):]
    lines = header.split(b"\r\n")
    out: list[bytes] = []
    size = 0  # of the current field, continuation lines included
    for index, line in enumerate(lines):
        if line[:1] in (b" ", b"\t") or (line and b":" not in line) or not _starts_field(line):
            if size + len(line) + 3 > HEADER_SIZE_LIMIT:  # with " " and CRLF
                continue  # Postfix's header_size_limit: the excess of a header is dropped
            size += len(line) + 3
        else:
            line = line[:HEADER_SIZE_LIMIT]
            size = len(line)
        if not line or line[:1] in (b" ", b"\t") or (root and index == 0
                                                      and line.startswith(b"From ")):
            out.append(line)
            continue
        name, colon, rest = line.partition(b":")
        name = name.rstrip(b" \t")
        if not colon or not name or b" " in name or b"\t" in name:
            line = b" " + line  # "meeting at 10:00" is text, not a field named so
        elif not _FIELD_LINE.match(line):
            line = _NAME_BYTES.sub(b"_", name) + b":" + rest
        out.append(line)
    # A value ending in a parameter name with RFC 2231's star and nothing after it
    # ("boundary*") raises IndexError in the stdlib's header parser, at every read of the
    # field; a space after the star reads the same for every client and parses.
    return b"\r\n".join(line + b" " if line.endswith(b"*") else line for line in out)


def _starts_field(line: bytes) -> bool:
    name = line.partition(b":")[0].rstrip(b" \t")
    return bool(name) and b" " not in name and b"\t" not in name


def _skeleton(raw: Raw, start: int, body_start: int, end: int, *, root: bool = False,
              default_type: str = "text/plain") -> EmailMessage:
    header = header_bytes(bytes(raw[start:body_start]), root).rstrip(b"\r\n")
    skeleton = _HEADERS.parsebytes(header + b"\r\n\r\n" if header else b"\r\n")
    assert isinstance(skeleton, EmailMessage)
    skeleton.set_default_type(default_type)
    skeleton.set_payload(bytes(raw[body_start:min(end, body_start + SKELETON_BODY)])
                         .decode("ascii", "surrogateescape")
                         if end - body_start <= SKELETON_BODY
                         or skeleton.get_content_maintype() == "message" else "")
    return skeleton


def _boundary(skeleton: EmailMessage) -> bytes | None:
    """The boundary of a multipart, in every form a client may write it: quoted, bare, and
    RFC 2231 (`boundary*=`, `boundary*0*=`, `boundary*1=`...), read from the raw header."""
    from . import parts  # parts reads the parameters; it imports nothing from here

    if not parts.content_type(skeleton).startswith("multipart/"):
        return None
    return parts.boundary_param(skeleton) or None


def _delimiters(raw: Raw, boundary: bytes, start: int, end: int) -> list[tuple[int, int, bool]]:
    """(line start, line end incl. CRLF, closing?) of each delimiter line in [start, end)."""
    dash = b"--" + boundary
    found: list[tuple[int, int, bool]] = []
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
            if found and found[-1][2]:
                # More parts after a closing delimiter (a nested multipart that reused its
                # parent's boundary): the close was not the end. Reading on finds every
                # part; stopping there would leave files in an unread epilogue.
                found[-1] = (found[-1][0], found[-1][1], False)
            found.append((hit, line_end, closing))
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
    boundary = _boundary(part.skeleton)
    if boundary is None:
        return
    if depth >= MAX_DEPTH:
        setattr(part.skeleton, OPAQUE, True)
        return
    from . import parts

    # RFC 2046 5.1.5: in a digest, a part without Content-Type is a message/rfc822.
    default = ("message/rfc822" if parts.content_type(part.skeleton) == "multipart/digest"
               else "text/plain")
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
        child = Part(line_end, body_start, end,
                     _skeleton(raw, line_end, body_start, end, default_type=default),
                     delimiter_at=line_start)
        part.children.append(child)
        _fill(raw, child, depth + 1)
    part.skeleton.set_payload([child.skeleton for child in part.children])


def scan(raw: Raw) -> Part:
    """The whole message: its header section, and its parts as ranges with skeletons."""
    end = len(raw)
    body_start = header_end(raw, 0, end)
    root = Part(0, body_start, end, _skeleton(raw, 0, body_start, end, root=True))
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
