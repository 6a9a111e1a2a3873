"""Header and text decoding for display: RFC 2047 words, ISO-2022-JP (with the Windows
extensions), UTF-8, raw 8-bit; anything broken comes out with replacement characters,
never an exception. Control characters are shown as spaces: a subject cannot fake lines."""
from __future__ import annotations

import codecs
import email.header
import re

from milters.core.jis import decode_cp50220

_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")
_JIS_NAMES = {"iso-2022-jp", "iso2022jp", "iso-2022-jp-1", "iso-2022-jp-2", "iso-2022-jp-3",
              "iso-2022-jp-ext", "csiso2022jp", "cp50220", "cp50221", "cp50222"}
_SURROGATE = re.compile("[\udc80-\udcff]")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Bytes in a declared charset (or none) to text; never raises."""
    name = (charset or "").strip().lower().split("*", 1)[0]  # RFC 2231 language suffix
    if name in _JIS_NAMES or b"\x1b$" in data:
        return decode_cp50220(data)
    if name in ("shift_jis", "shift-jis", "sjis", "x-sjis", "ms_kanji"):
        name = "cp932"  # what Japanese Windows actually sends under that label
    if name:
        try:
            codecs.lookup(name)
            return data.decode(name, "replace")
        except (LookupError, ValueError):
            pass  # unknown label: guess below
    for guess in ("utf-8", "cp932"):
        try:
            return data.decode(guess)
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", "replace")


def unescape_raw(value: str) -> str:
    """A header parsed from bytes keeps undecodable 8-bit bytes as surrogates: decode them."""
    if not _SURROGATE.search(value):
        return value
    return decode_bytes(value.encode("utf-8", "surrogateescape"), None)


def decode_header(value: object, limit: int = 2000) -> str:
    """A header value as a person reads it, on one line, at most `limit` characters."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):  # compat32's wrapper of a raw 8-bit value
        try:
            text = "".join(decode_bytes(data, None if charset == "unknown-8bit" else charset)
                           if isinstance(data, bytes) else data
                           for data, charset in email.header.decode_header(value))
        except Exception:  # noqa: BLE001 - shown with replacements below
            text = str(value)
    else:
        text = unescape_raw(str(value))
    if "\x1b$" in text:  # raw ISO-2022-JP without encoded words (old Japanese clients)
        text = decode_cp50220(text.encode("ascii", "replace"))
    if _ENCODED_WORD.search(text):
        try:
            pieces = email.header.decode_header(text)
            text = "".join(piece if isinstance(piece, str) else decode_bytes(piece, charset)
                           for piece, charset in pieces)
        except Exception:  # noqa: BLE001 - a broken header is shown as it is, never raised
            pass
    text = _CONTROLS.sub(" ", text.replace("\r\n", " ").replace("\n", " "))
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit] + " ... (truncated)"
