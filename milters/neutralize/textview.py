"""A text part read the way every client might read it, so that none of them finds a live
link we missed.

A part is normally read once: transfer encoding undone, then its declared charset. When
that reading is not certain (a charset Python does not know, bytes the charset cannot
decode, base64 with characters that are not base64), a client may show something else: the
raw bytes of a broken base64 body, or the text in the charset it falls back to (UTF-8 or
Latin-1, which agree on ASCII, where URLs live). Those readings are kept too; the part is
then always rewritten (in UTF-8, by us) from all of them, never passed as it came.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field

from milters.core.message import decode_charset
from milters.core.mime.scan import Part, Raw
from milters.core.mime.stream import decoded

_BASE64_CLEAN = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_WHITESPACE = re.compile(rb"\s+")


@dataclass
class TextView:
    text: str  # the reading a standard client makes
    others: list[str] = field(default_factory=list)  # readings other clients may make
    doubt: str = ""  # why the reading is not certain ("" = it is)


def _charset_known(charset: str | None) -> bool:
    if charset is None:
        return True  # us-ascii by RFC 2045
    try:
        codecs.lookup(charset)
        return True
    except LookupError:
        return charset.lower() in ("iso-2022-jp", "shift_jis", "x-sjis")


def _base64_broken(raw: Raw, part: Part) -> bool:
    cte = str(part.skeleton.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte != "base64":
        return False
    body = _WHITESPACE.sub(b"", bytes(raw[part.body_start:part.end]))
    return _BASE64_CLEAN.fullmatch(body) is None or len(body) % 4 != 0


def read_text(raw: Raw, part: Part) -> TextView:
    data = b"".join(decoded(raw, part))
    charset = part.skeleton.get_content_charset()
    view = TextView(decode_charset(data, charset))
    if not _charset_known(charset):
        view.doubt = f"its charset ({charset[:40] if charset else '-'}) is unknown"
    elif "\ufffd" in view.text and "\ufffd".encode() not in data:
        view.doubt = f"it is not valid {charset}"
    if view.doubt:
        view.others.append(data.decode("utf-8", "replace"))
    if _base64_broken(raw, part):
        view.doubt = view.doubt or "its base64 encoding is broken"
        view.others.append(bytes(raw[part.body_start:part.end]).decode("utf-8", "replace"))
    return view
