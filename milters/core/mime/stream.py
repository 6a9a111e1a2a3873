"""Decoding parts and writing the new message body in pieces, from the ranges scan
found: a 20 MB attachment is never held whole in memory, encoded or decoded.

The new body keeps every byte of the parts that stay; removed parts are cut out with the
delimiter line before them; new parts go before the closing delimiter of a top-level
multipart/mixed, or the old content is wrapped into a new multipart/mixed as its first part.
"""
from __future__ import annotations

import base64
import binascii
import quopri
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

from ..edits import AddHeader, ChangeHeader, Edit, ReplaceBody
from . import embedded
from .scan import Part, Raw, header_end, release

CHUNK = 1024 * 1024
SPOOL = 1024 * 1024  # temporary files stay in memory up to this size
_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/=]")
_B64_LINE = 57 * 1024  # 57 bytes make one 76-character base64 line
# One header field with its continuation lines.
_FIELD = re.compile(rb"(?ms)^([^ \t\r\n][^:\r\n]*):.*?\r\n(?=[^ \t]|\Z)")
# A top-level field as Postfix's is_header() takes one: printable ASCII but for the colon,
# then optional blanks and the colon.
_HEADER_FIELD = re.compile(rb"(?s)([!-9;-~]+)[ \t]*:.*?\r\n(?=[^ \t]|\Z)")


def spool() -> tempfile.SpooledTemporaryFile[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL)


def _base64_chunks(raw: Raw, start: int, end: int) -> Iterator[bytes]:
    carry = b""
    for at in range(start, end, CHUNK):
        text = carry + _B64_JUNK.sub(b"", raw[at:min(end, at + CHUNK)])
        release(raw, at, min(end, at + CHUNK))
        usable = len(text) - len(text) % 4
        carry = text[usable:]
        if usable:
            yield _b64(text[:usable])
    if carry:
        yield _b64(carry + b"=" * (-len(carry) % 4))


def _b64(text: bytes) -> bytes:
    try:
        return binascii.a2b_base64(text)
    except binascii.Error:  # padding in the middle and the like: what can be read
        return b"".join(_b64_lenient(text[i:i + 4]) for i in range(0, len(text), 4))


def _b64_lenient(group: bytes) -> bytes:
    try:
        return binascii.a2b_base64(group)
    except binascii.Error:
        return b""


def decoded(raw: Raw, part: Part) -> Iterator[bytes]:
    """The part's body, transfer encoding undone, in pieces (a uuencode or yEnc block found
    inside a text part, core.mime.embedded: the file it holds)."""
    if embedded.is_embedded(part):
        yield from embedded.decoded(raw, part)
        return
    cte = str(part.skeleton.get("Content-Transfer-Encoding", "")).strip().lower()
    start, end = part.body_start, part.end
    if cte == "base64":
        yield from _base64_chunks(raw, start, end)
    elif cte == "quoted-printable":
        # Cut only at line ends, where a soft line break cannot be split.
        at = start
        while at < end:
            stop = raw.rfind(b"\r\n", at, min(end, at + CHUNK))
            stop = min(end, at + CHUNK) if stop <= at or at + CHUNK >= end else stop + 2
            yield quopri.decodestring(bytes(raw[at:stop]))
            at = stop
    else:
        for at in range(start, end, CHUNK):
            yield bytes(raw[at:min(end, at + CHUNK)])


def decode_to_file(raw: Raw, part: Part) -> tempfile.SpooledTemporaryFile[bytes]:
    out = spool()
    for chunk in decoded(raw, part):
        out.write(chunk)
    out.seek(0)
    return out


def base64_lines(source: BinaryIO) -> Iterator[bytes]:
    """A file as base64 in 76-character CRLF lines (RFC 2045 6.8)."""
    while block := source.read(_B64_LINE):
        yield base64.encodebytes(block).replace(b"\n", b"\r\n")


@dataclass
class NewPart:
    """A part to add: its header section (ending in CRLF CRLF) and body pieces."""

    header: bytes
    body: Iterator[bytes] | bytes = b""

    def pieces(self) -> Iterator[bytes]:
        yield self.header
        yield from self.body_pieces()

    def body_pieces(self) -> Iterator[bytes]:
        if isinstance(self.body, bytes):
            yield self.body
        else:
            yield from self.body


@dataclass
class Rebuilt:
    body: tempfile.SpooledTemporaryFile[bytes]
    # The message's MIME headers after the change: name -> value, None = remove.
    mime_headers: dict[str, str | None] = field(default_factory=dict)

    def edits(self, present: Iterable[str]) -> list[Edit]:
        """The milter edits that turn the message into this one, given the names of the
        header fields it has now, in order (repeats included). Exactly one of each MIME
        header is left: a repeated one (or one whose name starts with a byte-order mark) is
        deleted in every copy and added once, since which copy a client reads differs."""
        names = list(present)
        edits: list[Edit] = []
        for name, value in self.mime_headers.items():
            same = [n for n in names if _bare_name(n) == name.lower()]
            if len(same) == 1 and same[0].lower() == name.lower():
                edits.append(ChangeHeader(name, 1, value or ""))  # "" deletes it
                continue
            for exact in dict.fromkeys(same):  # each spelling, highest index first
                count = sum(1 for n in names if n == exact)
                edits += [ChangeHeader(exact, i, "") for i in range(count, 0, -1)]
            if value is not None:
                edits.append(AddHeader(name, value))
        edits.append(ReplaceBody(self.body))
        return edits


def _bare_name(name: str) -> str:
    """A header name as compared: case, surrounding blanks and a UTF-8 byte-order mark (the
    first field of a file saved by some editors) do not count."""
    return name.strip().lstrip("\ufeff").strip().lower()


def _fields(raw: Raw, start: int, end: int) -> list[re.Match[bytes]]:
    header = bytes(raw[start:end]).rstrip(b"\r\n") + b"\r\n"
    return list(_FIELD.finditer(header))


def _mime_lines(raw: Raw, root: Part) -> bytes:
    """The root's own Content-* header fields, as they came (for a wrapped first part)."""
    return b"".join(m.group(0) for m in _fields(raw, root.start, root.body_start)
                    if m.group(1).lower().startswith(b"content-"))


_BOM = b"\xef\xbb\xbf"


def _leading_fields(raw: Raw) -> list[tuple[str, bytes]]:
    """The top-level header fields as (compared name, field bytes), read as Postfix and the
    stdlib read them: the section ends at the blank line or at the first line that is
    neither a field nor a continuation (the rest is body, never copied as a header). A
    byte-order mark before the first field is dropped."""
    end = header_end(raw, 0, len(raw))
    header = bytes(raw[:end]).rstrip(b"\r\n") + b"\r\n"
    if header.startswith(_BOM):
        header = header[len(_BOM):]
    fields, at = [], 0
    while at < len(header):
        found = _HEADER_FIELD.match(header, at)
        if found is None:
            break
        fields.append((found.group(1).decode("ascii", "replace").strip().lower(),
                       found.group(0)))
        at = found.end()
    return fields


def copy_header(raw: Raw, changes: dict[str, str | None],
                added: list[tuple[str, str]]) -> bytes:
    """The message's header section for a re-injected copy: the fields in `changes` replaced
    in every copy (None: removed), `added` appended, everything else as it came."""
    lowered = {name.lower() for name in changes}
    kept = b"".join(text for name, text in _leading_fields(raw) if name not in lowered)
    new = b"".join(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
                   for name, value in list(changes.items()) + added if value is not None)
    return kept + new + b"\r\n"


def _removal(raw: Raw, part: Part) -> tuple[int, int]:
    """The bytes that take `part` out: its delimiter line with the CRLF before it."""
    delimiter = part.delimiter_at
    if raw[delimiter - 2:delimiter] == b"\r\n":
        return delimiter - 2, part.end
    return delimiter, min(part.end + 2, len(raw))


Cut = tuple[int, int, "NewPart | None"]  # bytes [start, end) left out, or written over


def header_fields(header: bytes) -> dict[str, str]:
    """A part's header section as name -> unfolded value (the last of a repeated name)."""
    return {m.group(1).decode("ascii", "replace").strip():
            m.group(0).split(b":", 1)[1].decode("utf-8", "surrogateescape").strip()
            .replace("\r\n", "")
            for m in _FIELD.finditer(header.rstrip(b"\r\n") + b"\r\n")}


def rebuild(raw: Raw, root: Part, removed: list[Part], added: list[NewPart],
            replaced: list[tuple[Part, NewPart]] = ()) -> Rebuilt:  # type: ignore[assignment]
    """The new body: `removed` parts cut out, `replaced` parts written over in place (their
    header section too), `added` parts appended. A replaced root is the new content itself:
    its header fields become the message's MIME headers."""
    out = spool()
    root_new = next((new for part, new in replaced if part is root), None)
    ctype = root.skeleton.get_content_type()
    removed, replaced, root_emptied = _no_empty_multipart(root, removed, list(replaced))
    root_gone = any(p is root for p in removed) or (
        root_emptied and (not added or ctype != "multipart/mixed"))
    if root_gone and not added:
        added = [EMPTIED]
    cuts: list[Cut] = sorted([(*_removal(raw, p), None) for p in removed if p is not root]
                             + [(p.start, p.end, new) for p, new in replaced if p is not root],
                             key=lambda cut: cut[:2])
    if root_new is None and ctype == "multipart/mixed" and root.boundary and not root_gone:
        insert_at = root.close_at if root.close_at is not None else len(raw)
        _copy_except(raw, root.body_start, insert_at, cuts, out)
        dash = b"--" + root.boundary
        if root.close_at is None:
            out.write(b"\r\n")
        _write_parts(dash, added, out)
        if root.close_at is not None:
            _copy_except(raw, insert_at, len(raw), cuts, out)
        else:
            out.write(dash + b"--\r\n")
        out.seek(0)
        return Rebuilt(out, _one_of_each(raw))
    if root_new is not None and not added:
        for piece in root_new.body_pieces():
            out.write(piece)
        out.seek(0)
        fields = header_fields(root_new.header)
        return Rebuilt(out, {"MIME-Version": "1.0",
                             **{name: fields.get(name) for name in _ROOT_MIME}})
    # Wrap: the old content (if any is left) becomes the first part of a new mixed one.
    boundary = b"=_mailmoat_" + secrets.token_hex(12).encode()
    dash = b"--" + boundary
    if root_new is not None:
        _write_parts(dash, [root_new], out)
    elif not root_gone:
        out.write(dash + b"\r\n" + _mime_lines(raw, root) + b"\r\n")
        _copy_except(raw, root.body_start, len(raw), cuts, out)
        out.write(b"\r\n")
    _write_parts(dash, added, out)
    out.write(dash + b"--\r\n")
    out.seek(0)
    return Rebuilt(out, {"MIME-Version": "1.0",
                         "Content-Type": f'multipart/mixed; boundary="{boundary.decode()}"',
                         "Content-Transfer-Encoding": None, "Content-Disposition": None})


# What stands where a multipart lost every part: MIME has no empty multipart (RFC 2046
# 5.1.1 asks for at least one body part), and some clients drop such a message whole.
EMPTIED = NewPart(b"Content-Type: text/plain; charset=us-ascii\r\n"
                  b"Content-Transfer-Encoding: 7bit\r\n\r\n"
                  b"(The parts that were here have been removed.)\r\n")


def _no_empty_multipart(root: Part, removed: list[Part],
                        replaced: list[tuple[Part, NewPart]]
                        ) -> tuple[list[Part], list[tuple[Part, NewPart]], bool]:
    """`removed` and `replaced` with every multipart that would lose all its parts written
    over by the EMPTIED note (the topmost one only; what is inside it goes with it), and
    whether the root itself would be left empty."""
    # By range, not identity: a caller may hand a part over as a range of its own.
    gone = {_span(p) for p in removed}
    kept = {_span(p) for p, _ in replaced}
    emptied: set[tuple[int, int]] = set()
    order: list[Part] = []
    stack = [root]
    while stack:  # parents before children; reversed below
        part = stack.pop()
        order.append(part)
        stack.extend(part.children)
    for part in reversed(order):
        if part.children and _span(part) not in kept and all(
                _span(c) in gone or _span(c) in emptied for c in part.children):
            emptied.add(_span(part))
    if not emptied:
        return removed, replaced, False
    inside: set[tuple[int, int]] = set()
    tops: list[Part] = []
    stack = [root]
    while stack:
        part = stack.pop()
        if _span(part) in emptied and part is not root:
            tops.append(part)
            inside.update(_span(p) for p in _descendants(part))
            continue
        stack.extend(part.children)
    removed = [p for p in removed if _span(p) not in inside]
    replaced = [(p, new) for p, new in replaced if _span(p) not in inside]
    return removed, replaced + [(p, EMPTIED) for p in tops], _span(root) in emptied


def _span(part: Part) -> tuple[int, int]:
    return part.start, part.end


def _descendants(part: Part) -> list[Part]:
    found, stack = [], list(part.children)
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(child.children)
    return found


def _one_of_each(raw: Raw) -> dict[str, str | None]:
    """The top-level MIME fields that came more than once, each set to its first value (the
    one the stdlib and this scan read), so that exactly one is left; MIME-Version always."""
    fields = _leading_fields(raw)
    changes: dict[str, str | None] = {"MIME-Version": "1.0"}
    for name in _ROOT_MIME:
        same = [text for bare, text in fields if bare == name.lower()]
        if len(same) > 1:
            changes[name] = (same[0].split(b":", 1)[1].decode("utf-8", "surrogateescape")
                             .replace("\r\n", "").strip())
    return changes


# The root's MIME header fields that a replaced root brings with it (absent = removed).
_ROOT_MIME = ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition")


def _write_parts(dash: bytes, parts: list[NewPart], out: BinaryIO) -> None:
    for new in parts:
        out.write(dash + b"\r\n")
        for piece in new.pieces():
            out.write(piece)
        out.write(b"\r\n")


def _copy_except(raw: Raw, start: int, end: int, cuts: list[Cut], out: BinaryIO) -> None:
    at = start
    for cut_start, cut_end, replacement in cuts:
        if cut_end <= at or cut_start >= end:
            continue
        _copy(raw, at, max(at, cut_start), out)
        if replacement is not None:
            for piece in replacement.pieces():
                out.write(piece)
        at = max(at, cut_end)
    _copy(raw, at, end, out)


def _copy(raw: Raw, start: int, end: int, out: BinaryIO) -> None:
    for at in range(start, end, CHUNK):
        out.write(raw[at:min(end, at + CHUNK)])
        release(raw, at, min(end, at + CHUNK))
