"""Find every attachment of a message, with its real file name and decoded bytes.

Japanese mail clients have written file names in every historic way: RFC 2231 in
ISO-2022-JP or UTF-8, RFC 2047 words inside a quoted parameter, raw Shift_JIS, EUC-JP or
JIS bytes. The stdlib reads ISO-2022-JP without the Windows extensions (①, ㈱, 髙) and lets
a Shift_JIS trail byte 0x5C ("表", "ソ") escape the closing quote, so parameters are read
here from the raw header text; the stdlib tree is used only for the MIME structure.

Nothing here raises on malformed MIME: a broken part gives what can be read from it.
"""
from __future__ import annotations

import binascii
import io
import quopri
import re
from dataclasses import dataclass
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from typing import Iterator, cast
from urllib.parse import unquote, unquote_to_bytes

from milters.core.jis import decode_cp50220
from milters.core.message import decode_charset, decode_words


@dataclass
class Attachment:
    """One attachment. `part` is the node inside the caller's tree (to remove or replace);
    `filename` is decoded but not sanitised; `data` is the content after the transfer
    encoding is undone (for a message, the embedded message itself)."""

    part: EmailMessage
    filename: str
    content_type: str
    data: bytes
    size: int
    is_message: bool = False


# Attached mail: one unit, never walked into (its own attachments travel inside the .eml).
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_MIME_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_CID_URL = re.compile(r"cid:([^\"'\s>)]+)", re.IGNORECASE)
_BASE64_NOISE = re.compile(rb"[^A-Za-z0-9+/=]")
_CONTINUATION = re.compile(r"\*(\d+)(\*?)")
# Regenerating an embedded message: CRLF as on the wire, header lines as they came.
_WIRE = email_policy.default.clone(linesep="\r\n", refold_source="none", cte_type="8bit")


def find_attachments(msg: EmailMessage, *, inline_images: bool = False) -> list[Attachment]:
    """Every attachment in document order. Pictures that an HTML body shows through `cid:`
    are body, unless `inline_images`."""
    body = _main_body(msg)
    references: dict[int, tuple[set[str], str]] = {}
    found = []
    for part, parent in _leaves(msg):
        if _is_attachment(part, parent, body, references, inline_images):
            found.append(_attachment(part))
    return found


# --- which parts are attachments -------------------------------------------------------

def _leaves(root: Message) -> Iterator[tuple[Message, Message | None]]:
    """(part, parent) for every non-multipart part in document order; message/* parts are
    leaves. Iterative: hostile nesting must not hit the recursion limit."""
    stack: list[tuple[Message, Message | None]] = [(root, None)]
    while stack:
        part, parent = stack.pop()
        children = _children(part)
        if children is None:
            yield part, parent
        else:
            stack.extend((child, part) for child in reversed(children))


def _children(part: Message) -> list[Message] | None:
    if _content_type(part).startswith("message/") or not part.is_multipart():
        return None
    payload = part.get_payload()
    return [child for child in payload if isinstance(child, Message)] if isinstance(
        payload, list) else None


def _main_body(msg: Message) -> set[int]:
    """ids of the text parts a reader sees as the message itself: every alternative, the
    root of a multipart/related, the first part of a multipart/mixed. These stay body even
    when named (some gateways and webmails put a name on the body part)."""
    body: set[int] = set()
    stack = [msg]
    while stack:
        part = stack.pop()
        children = _children(part)
        ctype = _content_type(part)
        if children is None:
            if ctype.startswith("text/"):
                body.add(id(part))
        elif ctype == "multipart/alternative":
            stack.extend(children)
        elif ctype == "multipart/related" and children:
            stack.append(_related_root(part, children))
        elif children:
            stack.append(children[0])
    return body


def _related_root(related: Message, children: list[Message]) -> Message:
    start = _unbracket(_decoded_param(_params(related, "content-type")[1], "start"))
    for child in children:
        if start and _unbracket(_header(child, "content-id")) == start:
            return child
    return children[0]


def _is_attachment(part: Message, parent: Message | None, body: set[int],
                   references: dict[int, tuple[set[str], str]], inline_images: bool) -> bool:
    ctype = _content_type(part)
    maintype = ctype.split("/", 1)[0]
    if maintype == "multipart":  # a multipart without a boundary: one text blob, no files;
        # one left unsplit because it is nested too deep: all of it, fail closed
        return bool(getattr(part, "_mailmoat_opaque", False))
    if ctype in _MESSAGE_TYPES or _disposition(part) == "attachment":
        return True
    if maintype == "message":  # delivery-status and the like: report structure, not files
        return False
    if maintype == "text":  # unnamed text is shown in line; the main body even when named
        return id(part) not in body and bool(_filename(part))
    if _is_inline_image(part, parent, ctype, references):
        return inline_images
    return True  # a file, named or not: clients show it as an attachment either way


def _is_inline_image(part: Message, parent: Message | None, ctype: str,
                     references: dict[int, tuple[set[str], str]]) -> bool:
    if parent is None or not ctype.startswith("image/"):
        return False
    if _content_type(parent) != "multipart/related":
        return False
    if id(parent) not in references:
        references[id(parent)] = _html_references(parent)
    cids, html = references[id(parent)]
    cid = _unbracket(_header(part, "content-id"))
    location = _header(part, "content-location").strip()
    return bool(cid and cid in cids) or bool(location and location in html)


def _html_references(related: Message) -> tuple[set[str], str]:
    """The cid: targets (lower case, RFC 2392 unescaped) and the text of the HTML parts."""
    texts = [_decode(_payload_bytes(leaf), _decoded_param(_params(leaf, "content-type")[1],
                                                          "charset") or None)
             for leaf, _ in _leaves(related) if _content_type(leaf) == "text/html"]
    html = "\n".join(texts)
    return {unquote(cid).lower() for cid in _CID_URL.findall(html)}, html


# --- building an Attachment --------------------------------------------------------------

def _attachment(part: Message) -> Attachment:
    ctype = _content_type(part)
    data = _payload_bytes(part)
    is_message = ctype in _MESSAGE_TYPES
    filename = _filename(part) or (_message_filename(data) if is_message else "")
    return Attachment(part=cast(EmailMessage, part), filename=filename, content_type=ctype,
                      data=data, size=len(data), is_message=is_message)


def _message_filename(data: bytes) -> str:
    # Read from the bytes, not the parsed sub-tree: a base64-encoded message/rfc822
    # (illegal, but sent) parses as garbage and decodes to the real message.
    headers = BytesHeaderParser(policy=email_policy.default).parsebytes(data)
    subject = _header_text(_header(headers, "subject"))
    return f"{subject}.eml" if subject else "message.eml"


def _payload_bytes(part: Message) -> bytes:
    cte = _params(part, "content-transfer-encoding")[0].lower()
    payload = _raw_payload(part)
    if isinstance(payload, list):  # an embedded message: serialise it again
        raw = b"".join(_flatten(item) for item in payload if isinstance(item, Message))
    else:
        raw = _raw_bytes(payload) if isinstance(payload, str) else b""
    return _undo_transfer_encoding(raw, cte)


def _raw_payload(part: Message) -> object:
    # The stored payload, as the stdlib's own generator reads it: get_payload() re-decodes
    # 8-bit text with the declared charset (replacing what does not fit) and parses
    # Content-Type again, which raises on some RFC 2231 names; decode=True returns the
    # still-encoded text for some broken base64 lengths.
    return part._payload  # noqa: SLF001


def _undo_transfer_encoding(raw: bytes, cte: str) -> bytes:
    """7bit, 8bit, binary and unknown encodings are taken as they are."""
    if cte == "base64":
        return _decode_base64(raw)
    if cte == "quoted-printable":
        return quopri.decodestring(raw)
    return raw


def _decode_base64(raw: bytes) -> bytes:
    """Decode what can be decoded: stray characters are dropped, each run between padding
    is decoded on its own (some encoders pad every line), a dangling character is lost."""
    try:  # the common, well-formed case at C speed
        return binascii.a2b_base64(raw.translate(None, b" \t\r\n"), strict_mode=True)
    except binascii.Error:
        pass
    out = bytearray()
    for run in re.split(rb"=+", _BASE64_NOISE.sub(b"", raw)):
        whole = len(run) - len(run) % 4
        out += binascii.a2b_base64(run[:whole])
        tail = run[whole:]
        if len(tail) >= 2:
            out += binascii.a2b_base64(tail + b"=" * (4 - len(tail)))
    return bytes(out)


def _flatten(message: Message) -> bytes:
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_WIRE).flatten(message)
    return out.getvalue()


# --- raw headers and their parameters ----------------------------------------------------

def _header(part: Message, name: str) -> str:
    """The first header `name` as it came, unfolded; 8-bit bytes stay surrogate escapes."""
    for key, value in part.raw_items():
        if key.lower() == name:
            return re.sub(r"[\r\n]", "", str(value)).strip()
    return ""


def _content_type(part: Message) -> str:
    value = _params(part, "content-type")[0].lower()
    return value if _MIME_TYPE.fullmatch(value) else part.get_default_type()


def content_type(part: Message) -> str:
    """The part's type as clients read it: lower case; its default (text/plain, or
    message/rfc822 in a digest) when missing or not a type."""
    return _content_type(part)


def boundary_param(part: Message) -> bytes:
    """The Content-Type boundary as bytes, from any of its forms: `boundary="..."`, bare,
    `boundary*=charset''%XX`, `boundary*0=`/`boundary*0*=` continuations. A boundary is
    compared byte for byte with the body, so it is never decoded to text."""
    params = _params(part, "content-type")[1]
    if "boundary*" in params:
        value = params["boundary*"]
        if value.count("'") >= 2:
            value = value.split("'", 2)[2]
        return unquote_to_bytes(_raw_bytes(value))
    pieces = _continuations(params, "boundary")
    if pieces:
        first, encoded = pieces[0]
        if encoded and first.count("'") >= 2:
            pieces[0] = (first.split("'", 2)[2], True)
        return b"".join(unquote_to_bytes(_raw_bytes(value)) if encoded else _raw_bytes(value)
                        for value, encoded in pieces)
    return _raw_bytes(params.get("boundary", ""))


def _disposition(part: Message) -> str:
    return _params(part, "content-disposition")[0].lower()


def _params(part: Message, header: str) -> tuple[str, dict[str, str]]:
    """The main value of a header and its parameters (names in lower case, values
    unquoted, encodings left for _decoded_param)."""
    segments = _split_unquoted(_header(part, header), ";")
    params: dict[str, str] = {}
    for segment in segments[1:]:
        name, sep, value = segment.partition("=")
        if sep:
            params.setdefault(name.strip().lower(), _unquote(value.strip()))
    return segments[0].strip(), params


def _split_unquoted(text: str, separator: str) -> list[str]:
    """Split at `separator` outside quoted strings and outside raw JIS runs."""
    pieces, start = [], 0
    for index, char, literal in _scan(text):
        if char == separator and literal:
            pieces.append(text[start:index])
            start = index + 1
    pieces.append(text[start:])
    return pieces


def _unquote(value: str) -> str:
    if not value.startswith('"'):
        return value
    chars = []
    for index, char, literal in _scan(value):
        if index == 0:
            continue
        if char == '"' and literal:
            break
        chars.append(char)
    return "".join(chars)


def _scan(text: str) -> Iterator[tuple[int, str, bool]]:
    """(index, char, outside_quotes) for the characters of a header value, quoted-pair
    backslashes removed. Raw JIS (ESC $ B ... ESC ( B) is opaque: its bytes include '"'
    and ';'. A backslash right after an odd run of 8-bit bytes is a Shift_JIS trail byte
    ("表" is 0x95 0x5C), not an escape."""
    quoted = jis = False
    index = 0
    while index < len(text):
        char = text[index]
        if text.startswith(("\x1b$B", "\x1b$@"), index):
            jis = True
        elif text.startswith(("\x1b(B", "\x1b(J"), index):
            jis = False
        elif jis:
            pass
        elif char == '"':
            quoted = not quoted
            yield index, char, True
            index += 1
            continue
        elif char == "\\" and quoted and not _is_trail_byte(text, index):
            index += 1
            if index < len(text):
                yield index, text[index], False
            index += 1
            continue
        yield index, char, not quoted and not jis
        index += 1


def _is_trail_byte(text: str, index: int) -> bool:
    run = 0
    while index - run - 1 >= 0 and "\udc80" <= text[index - run - 1] <= "\udcff":
        run += 1
    return run % 2 == 1


def _unbracket(value: str) -> str:
    return value.strip().strip("<>").strip().lower()


# --- file names --------------------------------------------------------------------------

def _filename(part: Message) -> str:
    """Content-Disposition filename, else Content-Type name; "" when neither decodes."""
    for header, key in (("content-disposition", "filename"), ("content-type", "name")):
        name = _decoded_param(_params(part, header)[1], key)
        if name:
            return name
    return ""


def _decoded_param(params: dict[str, str], key: str) -> str:
    """RFC 2231 forms first (clients send `filename*` beside a plain fallback)."""
    extended = _decode_extended([params[key + "*"]]) if key + "*" in params else ""
    return (extended or _continued(params, key)
            or (_plain_text(_raw_bytes(params[key])) if key in params else ""))


def _continued(params: dict[str, str], key: str) -> str:
    pieces = _continuations(params, key)
    if not pieces:
        return ""
    if pieces[0][1]:
        return _decode_extended([value if encoded else _quote_percent(value)
                                 for value, encoded in pieces])
    return _plain_text(_raw_bytes("".join(value for value, _ in pieces)))


def _continuations(params: dict[str, str], key: str) -> list[tuple[str, bool]]:
    """`key*0*`, `key*1`, ... in order, each with whether it is percent-encoded."""
    numbered = []
    for name, value in params.items():
        match = _CONTINUATION.fullmatch(name[len(key):]) if name.startswith(key) else None
        if match:
            numbered.append((int(match.group(1)), value, bool(match.group(2))))
    return [(value, encoded) for _, value, encoded in sorted(numbered)]


def _quote_percent(value: str) -> str:
    # An unencoded continuation inside an encoded value: keep its '%' literal.
    return value.replace("%", "%25")


def _decode_extended(pieces: list[str]) -> str:
    """RFC 2231 `charset'language'percent-encoded`, joined before decoding so a character
    split across continuations survives; an empty or missing charset is guessed."""
    value = "".join(pieces)
    charset, rest = "", value
    if value.count("'") >= 2:
        charset, _, rest = value.partition("'")
        rest = rest.partition("'")[2]  # the language tag tells nothing about the bytes
    data = unquote_to_bytes(_raw_bytes(rest))
    return _decode(data, charset) if charset.strip() else _plain_text(data)


def _plain_text(data: bytes) -> str:
    """A parameter without RFC 2231: raw JIS, raw 8-bit, and RFC 2047 words inside quotes
    (illegal, and what most Japanese clients send)."""
    text = _guess_text(data)
    if "=?" not in text:
        return text.strip()
    try:
        return decode_words(text)
    except UnicodeError:  # a codec that refuses errors="replace" (idna, undefined)
        return text.strip()


def _guess_text(data: bytes) -> str:
    if data.isascii():
        return decode_cp50220(data) if b"\x1b$" in data else data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # EUC-JP bytes are nearly always valid CP932 too, read as half-width katakana; a real
    # name seldom is, so on a tie the reading with fewer of them wins (CP932 first).
    readings = [text for text in (_strict(data, "cp932"), _strict(data, "euc-jp")) if text]
    if readings:
        return min(readings, key=_halfwidth_kana)
    return data.decode("cp932", errors="replace")


def _decode(data: bytes, charset: str | None) -> str:
    try:
        return decode_charset(data, charset)
    except UnicodeError:  # a codec that refuses errors="replace" (idna, undefined)
        return data.decode("utf-8", errors="replace")


def _strict(data: bytes, codec: str) -> str | None:
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        return None


def _halfwidth_kana(text: str) -> int:
    return sum("\uff61" <= char <= "\uff9f" for char in text)


def _raw_bytes(text: str) -> bytes:
    """Header text back to the bytes that came on the wire (8-bit bytes are surrogate
    escapes after the stdlib's BytesParser)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate set by code, not read from bytes
        return text.encode("utf-8", "replace")


def _header_text(value: str) -> str:
    return _plain_text(_raw_bytes(value)) if value else ""
