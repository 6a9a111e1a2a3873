"""A notice as a complete RFC 5322 message: headers that no value can break, a body in
ISO-2022-JP (Japanese: what every Japanese client reads, with CP50220's ① ㈱ 髙) or UTF-8.

Every value that reaches a header is made one line first, and a Subject that is not plain
short ASCII, or that looks like it holds an encoded word, goes out as RFC 2047 B words of
its own: a file name or subject carrying CR/LF, `=?...?=` or markup stays text.
"""
from __future__ import annotations

import base64
import math
import quopri
import re
import unicodedata
from datetime import datetime, timezone
from email.utils import format_datetime, make_msgid

from ..errors import ReviewError
from ..jis import encode_cp50220

JIS_LANGS = frozenset({"ja"})
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029\u0085]")
_HALFWIDTH_KANA = re.compile(r"[\uff61-\uff9f]+")
_ADDRESS = re.compile(r"[!#-'*+\-/-9=?A-Z^-~.]+@[A-Za-z0-9.\-\[\]:]+\Z")
_MSG_ID = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")
_WORD_MAX = 75  # RFC 2047: an encoded word is at most 75 characters
_LINE_MAX = 998  # RFC 5322: octets per line, line end not counted
LOOP_HEADER = "X-Mailmoat-Notice"


def clean(value: object) -> str:
    """Text with "\n" line ends and no other control character (an ESC would switch a
    reader's ISO-2022-JP state; a CR would end a header)."""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROLS.sub("", text)


def one_line(value: object) -> str:
    return " ".join(part.strip() for part in clean(value).split("\n") if part.strip())


def build_mail(*, from_addr: str, to_addrs: list[str], subject: str, body: str, lang: str,
               hostname: str, date: datetime | None = None, in_reply_to: str = "",
               kind: str = "review") -> bytes:
    """The notice with CRLF line ends, marked auto-generated (RFC 3834: no auto-replies;
    send it with a null envelope sender) and with our loop header."""
    if not _HOSTNAME.match(hostname):
        raise ReviewError(f"hostname {hostname!r} cannot go into a Message-ID")
    headers = [
        "From: " + _addresses([from_addr]),
        "To: " + _addresses(to_addrs),
        _subject(one_line(subject), lang),
        "Date: " + format_datetime(date or datetime.now(timezone.utc).astimezone()),
        "Message-ID: " + make_msgid(domain=hostname),
    ]
    parent = in_reply_to.strip()
    if _MSG_ID.match(parent):  # anything else (non-ASCII, junk) is left out, not fixed
        headers += ["In-Reply-To: " + parent, "References: " + parent]
    charset, transfer, lines = _body(clean(body), lang)
    headers += [
        "Auto-Submitted: auto-generated",
        f"{LOOP_HEADER}: {re.sub(r'[^a-z-]', '', kind) or 'review'}",
        "MIME-Version: 1.0",
        f"Content-Type: text/plain; charset={charset}",
        f"Content-Transfer-Encoding: {transfer}",
    ]
    text = "\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(lines) + "\r\n"
    return text.encode("ascii")


def _addresses(addresses: list[str]) -> str:
    found = []
    for address in addresses:
        address = one_line(address).strip("<> ")
        if not _ADDRESS.match(address):
            raise ReviewError(f"a notice cannot be addressed to {address[:80]!r} (an ASCII "
                              "address is needed)")
        found.append(address)
    if not found:
        raise ReviewError("a notice needs at least one recipient")
    return ",\r\n ".join(found)


# ---------------------------------------------------------------- Subject: RFC 2047 words

def _subject(subject: str, lang: str) -> str:
    head = "Subject: "
    if subject.isascii() and "=?" not in subject and len(head + subject) <= 78:
        return head + subject
    if not subject:
        return head.rstrip()
    jis = _to_jis(subject) if lang in JIS_LANGS else None
    prefix, encode = (("=?ISO-2022-JP?B?", _jis_strict) if jis is not None
                      else ("=?UTF-8?B?", lambda text: text.encode("utf-8")))
    words: list[str] = []
    chunk = ""
    for char in subject:  # each word ends on a whole character, in ASCII state (RFC 2047)
        room = _WORD_MAX - (len(head) if not words else 1)
        if chunk and _length(prefix, encode(chunk + char)) > room:
            words.append(_word(prefix, encode(chunk)))
            chunk = ""
        chunk += char
    if chunk:
        words.append(_word(prefix, encode(chunk)))
    return head + "\r\n ".join(words)


def _length(prefix: str, data: bytes) -> int:
    return len(prefix) + 4 * math.ceil(len(data) / 3) + 2


def _word(prefix: str, data: bytes) -> str:
    return f"{prefix}{base64.b64encode(data).decode('ascii')}?="


def _to_jis(text: str) -> bytes | None:
    """CP50220 bytes, or None when a character has no ISO-2022-JP form (an emoji).
    Half-width kana become full width first: ISO-2022-JP has none."""
    widened = _HALFWIDTH_KANA.sub(lambda m: unicodedata.normalize("NFKC", m.group(0)), text)
    try:
        return encode_cp50220(widened)
    except UnicodeEncodeError:
        return None


def _jis_strict(text: str) -> bytes:
    encoded = _to_jis(text)
    assert encoded is not None  # the whole subject encoded, so each part of it does
    return encoded


# ---------------------------------------------------------------- the body

def _body(text: str, lang: str) -> tuple[str, str, list[str]]:
    """(charset, transfer encoding, ASCII lines). Kept 7-bit: a notice may pass servers
    without 8BITMIME."""
    lines = text.split("\n")
    if lang in JIS_LANGS:
        encoded = [_to_jis(line) for line in lines]  # each line ends back in ASCII
        if all(line is not None and len(line) <= _LINE_MAX for line in encoded):
            return "ISO-2022-JP", "7bit", [line.decode("ascii") for line in encoded
                                           if line is not None]
    if text.isascii() and all(len(line) <= _LINE_MAX for line in lines):
        return "UTF-8", "7bit", lines
    if sum(1 for char in text if ord(char) >= 0x80) * 4 > len(text):
        data = (text + "\n").replace("\n", "\r\n").encode("utf-8")
        return "UTF-8", "base64", base64.encodebytes(data).decode("ascii").split()
    qp = quopri.encodestring(text.encode("utf-8")).decode("ascii")
    return "UTF-8", "quoted-printable", qp.split("\n")
