"""Fail closed: what the attachments milter cannot classify with certainty.

The core's reading (core.mime.scan) splits the message into byte ranges and lets
parts.find_attachments pick the files. Mail clients read broken MIME each in their own way,
so a part we take for body text may be shown as a file by the recipient's client. Such mail
must never leave with a file in the clear. Two levels:

Structure we cannot trust (the whole message becomes one attachment, `original.eml`, or is
tempfailed, per attachments.on_unparsable):
  - a multipart whose boundary the scan could not use (no boundary parameter, an RFC 2231
    form it did not read, nesting deeper than scan.MAX_DEPTH): stdlib
    NoBoundaryInMultipartDefect; its body was one opaque leaf we would have passed;
  - a multipart without an opening delimiter (StartBoundaryNotFoundDefect) or without its
    closing one (CloseBoundaryNotFoundDefect): where its last part ends is a guess;
  - a multipart with a transfer encoding other than 7bit/8bit/binary
    (InvalidMultipartContentTransferEncodingDefect): some clients decode it first;
  - a header section the parser had to guess the end of at the top level or of a multipart
    (MissingHeaderBodySeparatorDefect, FirstHeaderLineIsContinuationDefect), or with two
    Content-Type / Content-Transfer-Encoding fields (clients differ on which one wins);
  - a bare CR or bare LF outside the attachments' bodies: clients that take them as line
    ends see headers and delimiters the scan did not;
  - uuencode, BinHex or yEnc in a multipart's preamble or epilogue;
  - the message (without the attachments' bodies, up to STDLIB_CHECK bytes) is also read
    by the stdlib parser: any of the
    structural defects above in its tree (MultipartInvariantViolationDefect included), or a
    number of leaves that differs from the scan's (two readers disagree), is the same.

A message folded into its own header (a bare-CR message behind an MTA that does not take CR
as a line end: Postfix then reads the whole message as one From field, and rewrites it as a
list of addresses) cannot be put into a ZIP, since the header stays: whatever
on_unparsable says, it is tempfailed (Doubts.uncontainable).

Leaves we cannot trust (each is treated as an attachment: into the ZIP, offloaded or
deleted with the others):
  - a transfer encoding other than 7bit, 8bit, binary, base64, quoted-printable;
  - base64 that is not valid (characters outside the alphabet, padding inside:
    InvalidBase64CharactersDefect, InvalidBase64PaddingDefect);
  - a header section without its blank line (MissingHeaderBodySeparatorDefect), a repeated
    Content-Type or Content-Transfer-Encoding, or a Content-Type that is not type/subtype;
  - text holding uuencode (`begin 644 name`), BinHex or yEnc;
  - a body that starts with MIME header fields (a header section cut short by a UTF-8
    BOM or a fold without indentation: Postfix and the stdlib end the header there);
  - a part of a multipart/digest without Content-Type (implicitly message/rfc822), and
    message/partial or message/external-body (pieces of, or pointers to, another message).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from email import errors as email_errors
from email import policy as email_policy
from email.message import EmailMessage, Message

from milters.core.message import parse_bytes
from milters.core.mime.scan import Part, Raw

# The stdlib parser holds what it reads several times over: it reads the message without
# the attachments' bodies, and only up to this size (larger text bodies: the scan's checks).
STDLIB_CHECK = 4 * 1024 * 1024
_ENCODINGS = frozenset({"", "7bit", "8bit", "binary", "base64", "quoted-printable"})
_MULTIPART_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})
_MIME_TYPE = re.compile(rb"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", re.IGNORECASE)
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# A file carried inside text: uuencode's begin line, BinHex 4.0's banner, yEnc's header.
_ENCODED_FILE = re.compile(rb"(?im)^(?:begin(?:-base64)?[ \t]+[0-7]{3,4}[ \t]+\S"
                           rb"|\(This file must be converted with BinHex"
                           rb"|=ybegin[ \t].*\bname=)")
_BASE64_OK = re.compile(rb"[A-Za-z0-9+/\r\n \t]*(?:=[ \t\r\n]*){0,2}")
# A body that starts with MIME header fields: a header section Postfix and the stdlib cut
# short (a UTF-8 BOM before the first field, a fold without indentation), whose real
# structure a lenient client may still read.
# Before them any lines but an empty one: a field whose name has 8-bit bytes (it ended the
# header) and whatever follows it may be read as header fields by some client.
_MIME_IN_BODY = re.compile(rb"(?:[ \t]*\r\n)*(?:[ \t]*[^\r\n \t][^\r\n]*\r\n){0,2000}?"
                           rb"(?:\xef\xbb\xbf)?"
                           rb"(?i:mime-version|content-type|content-transfer-encoding)[ \t]*:")
# A header field holding MIME header fields and an encoded body (runs of base64 adding up
# to 120 characters, 90 bytes of file): a message folded into one field. (Not the
# signatures, whose h= lists field names and whose b= is base64.)
_MIME_IN_FIELD = re.compile(rb"(?i)(?:^|[ \t\r\n])(?:mime-version|content-type|"
                            rb"content-transfer-encoding)[ \t]*:[ \t]*[^ \t\r\n]")
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{40,}")
_FOLDED_BODY = 120
_SIGNATURES = frozenset({b"dkim-signature", b"arc-message-signature", b"arc-seal"})
_UNTRUSTED_MESSAGES = frozenset({"message/partial", "message/external-body"})
_STRUCTURE_DEFECTS = (
    email_errors.StartBoundaryNotFoundDefect, email_errors.CloseBoundaryNotFoundDefect,
    email_errors.MultipartInvariantViolationDefect, email_errors.NoBoundaryInMultipartDefect,
    email_errors.MissingHeaderBodySeparatorDefect,
    email_errors.FirstHeaderLineIsContinuationDefect,
    email_errors.InvalidMultipartContentTransferEncodingDefect)
_HEADER_DEFECTS = (email_errors.MissingHeaderBodySeparatorDefect,
                   email_errors.FirstHeaderLineIsContinuationDefect)


@dataclass
class Doubts:
    whole: str = ""  # why the structure cannot be trusted; "" = it can
    uncontainable: str = ""  # why not even the whole message can go into the ZIP
    parts: list[tuple[Part, str]] = field(default_factory=list)  # leaves taken as files


def examine(raw: Raw, root: Part, attachments: list[Part]) -> Doubts:
    """What cannot be classified with certainty, given the scan and the parts already
    found to be attachments."""
    doubts = Doubts()
    doubts.uncontainable = _message_in_a_field(bytes(raw[root.start:root.body_start]))
    if doubts.uncontainable:
        doubts.whole = doubts.uncontainable
        return doubts
    taken = {id(part) for part in attachments}
    for part, parent in _walk(root):
        header = bytes(raw[part.start:part.body_start])
        reason = _multipart_doubt(raw, part, header) if _is_multipart(part, header) else ""
        if not reason and part is root:
            reason = _header_doubt(part, header)
        if reason:
            doubts.whole = reason
            return doubts
        if part.children or id(part) in taken:
            continue
        reason = _header_doubt(part, header) or _leaf_doubt(raw, part, parent)
        if reason:
            doubts.parts.append((part, reason))
    doubts.whole = _bare_line_ends(raw, attachments) or _stdlib_disagrees(
        _without_bodies(raw, attachments), root)
    return doubts


def _without_bodies(raw: Raw, attachments: list[Part]) -> bytes:
    """The message with the attachments' bodies left out: they go into the ZIP whatever
    they hold, and the scan found no delimiter of theirs inside them, so the structure the
    stdlib reads is the same, at the cost of the rest of the message only."""
    pieces, at = [], 0
    for part in sorted(attachments, key=lambda p: p.body_start):
        if part.body_start >= at:
            pieces.append(bytes(raw[at:part.body_start]))
            at = part.end
    pieces.append(bytes(raw[at:]))
    return b"".join(pieces)


def _walk(root: Part) -> list[tuple[Part, Part | None]]:
    found: list[tuple[Part, Part | None]] = []
    stack: list[tuple[Part, Part | None]] = [(root, None)]
    while stack:
        part, parent = stack.pop()
        found.append((part, parent))
        stack.extend((child, part) for child in reversed(part.children))
    return found


def _field_values(header: bytes, name: bytes) -> list[bytes]:
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", header)
    return [m.group(1).strip() for m in re.finditer(
        rb"(?im)^" + re.escape(name) + rb"[ \t]*:(.*)$", unfolded)]


def _is_multipart(part: Part, header: bytes) -> bool:
    if part.boundary or part.skeleton.get_content_maintype() == "multipart":
        return True
    return any(value.lower().lstrip(b'"').startswith(b"multipart")
               for value in _field_values(header, b"content-type"))


def _cte(header: bytes) -> str:
    values = _field_values(header, b"content-transfer-encoding")
    return values[0].lower().strip(b'"').decode("ascii", "replace") if values else ""


def _multipart_doubt(raw: Raw, part: Part, header: bytes) -> str:
    if not part.boundary:
        return "multipart without a boundary the scan can use"
    if not part.children:
        return "multipart without its opening delimiter"
    if part.close_at is None:
        return "multipart without its closing delimiter"
    if _cte(header) not in _MULTIPART_ENCODINGS:
        return "multipart with a transfer encoding"
    first = part.children[0].delimiter_at
    if _ENCODED_FILE.search(raw, part.body_start, first) or \
            _ENCODED_FILE.search(raw, part.close_at, part.end):
        return "an encoded file in a multipart's preamble or epilogue"
    return _header_doubt(part, header)


def _header_doubt(part: Part, header: bytes) -> str:
    if any(isinstance(d, _HEADER_DEFECTS) for d in part.skeleton.defects):
        return "a header section without its blank line"
    for name in (b"content-type", b"content-transfer-encoding"):
        if len(_field_values(header, name)) > 1:
            return f"{name.decode()} given twice"
    types = _field_values(header, b"content-type")
    if types and not _MIME_TYPE.fullmatch(types[0].split(b";", 1)[0].strip().strip(b'"')):
        return "a content-type that is not type/subtype"
    return ""


def _leaf_doubt(raw: Raw, part: Part, parent: Part | None) -> str:
    header = bytes(raw[part.start:part.body_start])
    cte = _cte(header)
    if cte not in _ENCODINGS:
        return "an unknown transfer encoding"
    ctype = part.skeleton.get_content_type()
    if ctype in _UNTRUSTED_MESSAGES:
        return ctype
    if parent is not None and parent.skeleton.get_content_type() == "multipart/digest" \
            and not _field_values(header, b"content-type"):
        return "a digest part (implicitly message/rfc822)"
    if cte == "base64" and not _BASE64_OK.fullmatch(raw, part.body_start, part.end):
        return "invalid base64"
    if not ctype.startswith("message/") and _ENCODED_FILE.search(raw, part.body_start,
                                                                 part.end):
        return "uuencode, BinHex or yEnc in the text"
    if _MIME_IN_BODY.match(raw, part.body_start, min(part.end, part.body_start + 65536)):
        return "MIME header fields at the start of the body"
    return ""


def _message_in_a_field(header: bytes) -> str:
    for line in re.split(rb"\r\n(?![ \t])", header):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() not in _SIGNATURES and \
                (found := _MIME_IN_FIELD.search(value)) and \
                sum(map(len, _BASE64_RUN.findall(value, found.end()))) >= _FOLDED_BODY:
            return "MIME header fields and a body inside a header field (bare CR line ends?)"
    return ""


def _bare_line_ends(raw: Raw, attachments: list[Part]) -> str:
    """A bare CR or LF anywhere but inside an attachment's body (binary data may hold
    them, and those bytes go into the ZIP whatever they are)."""
    at = 0
    for part in sorted(attachments, key=lambda p: p.body_start) + [None]:
        stop = len(raw) if part is None else part.body_start
        if stop > at:
            # One byte more, so a CR just before `stop` sees its LF.
            hit = _BARE.search(raw, at, min(len(raw), stop + 1))
            if hit is not None and hit.start() < stop:
                return "a bare CR or LF outside the attachments"
        if part is not None:
            at = max(at, part.end)
    return ""


def _stdlib_disagrees(text: bytes, root: Part) -> str:
    if len(text) > STDLIB_CHECK:
        return ""
    try:
        tree = parse_bytes(text, email_policy.default)
    except Exception:  # noqa: BLE001 - any failure of the second reader is a doubt
        return "the stdlib parser cannot read it"
    leaves = 0
    for node in _stdlib_walk(tree):
        if any(isinstance(d, _STRUCTURE_DEFECTS) for d in node.defects):
            kinds = ",".join(sorted({type(d).__name__ for d in node.defects}))
            return f"stdlib parser: {kinds}"
        leaves += not node.is_multipart() or node.get_content_maintype() == "message"
    scanned = sum(1 for part, _ in _walk(root) if not part.children)
    if leaves != scanned:
        return f"the scan found {scanned} leaf parts, the stdlib parser {leaves}"
    return ""


def _stdlib_walk(tree: EmailMessage) -> list[Message]:
    """Every node down to message/* parts (not into them: the scan stops there too)."""
    found: list[Message] = []
    stack: list[Message] = [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        if node.get_content_maintype() == "message":
            continue
        payload = node.get_payload()
        if isinstance(payload, list):
            stack.extend(child for child in payload if isinstance(child, Message))
    return found
