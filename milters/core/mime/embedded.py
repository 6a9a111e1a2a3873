"""Files encoded inside a text part, the pre-MIME way: uuencode (`begin 644 name`), yEnc
(`=ybegin ... name=`) and BinHex 4.0. Thunderbird and Outlook show each as an attachment,
so a gateway must too: a file left inside the text would leave in the clear.

Each block becomes a pseudo part (a scan.Part whose range is the block, from its first line
to the end of its last one, with a skeleton that names the file), so every consumer removes
or replaces it like any other part: the delimiter_at/end range cuts exactly the block.
uuencode and yEnc are decoded (`decoded()`); BinHex stays encoded (its resource fork and
Finder data have no place in a ZIP) but counts as an attachment.
"""
from __future__ import annotations

import binascii
import re
from email import policy as email_policy
from email.message import EmailMessage
from typing import Iterator

from .scan import Part, Raw

UUENCODE = "x-uuencode"
YENC = "x-yenc"
BINHEX = "x-binhex"
_UU_BEGIN = re.compile(rb"(?m)^begin(?:-base64)? +([0-7]{3,4}) +([^\r\n]+?)[ \t]*\r?$")
_UU_END = re.compile(rb"(?m)^end[ \t]*\r?$")
_Y_BEGIN = re.compile(rb"(?m)^=ybegin [^\r\n]*?name=([^\r\n]*?)[ \t]*\r?$")
_Y_END = re.compile(rb"(?m)^=yend[^\r\n]*")
_HQX_START = re.compile(rb"(?m)^\(This file must be converted with BinHex[^\r\n]*")
_HQX = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"
_HQX_VALUE = {char: value for value, char in enumerate(_HQX)}


def find_embedded(raw: Raw, part: Part) -> list[Part]:
    """The encoded files inside a text part's body, in order. Only an unencoded body
    (7bit/8bit/binary) is searched: the ranges must be the bytes on the wire."""
    cte = str(part.skeleton.get("Content-Transfer-Encoding", "") or "").strip().lower()
    if cte not in ("", "7bit", "8bit", "binary"):
        return []
    found: list[Part] = []
    start, end = part.body_start, part.end
    for begin, finish, kind in ((_UU_BEGIN, _UU_END, UUENCODE), (_Y_BEGIN, _Y_END, YENC)):
        at = start
        while (head := begin.search(raw, at, end)) is not None:
            tail = finish.search(raw, head.end(), end)
            stop = tail.end() if tail is not None else end  # no end line: to the part's end
            if tail is not None and raw[stop - 1:stop] == b"\r":
                stop -= 1
            name = head.group(2 if kind == UUENCODE else 1)
            found.append(_pseudo(raw, head.start(), _next_line(raw, head.end(), end), stop,
                                 _name(bytes(name)), kind))
            at = stop
    at = start
    while (head := _HQX_START.search(raw, at, end)) is not None:
        colon = raw.find(b":", head.end(), end)
        close = raw.find(b":", colon + 1, end) if colon >= 0 else -1
        stop = end if close < 0 else close + 1
        body = colon if colon >= 0 else head.end()
        found.append(_pseudo(raw, head.start(), body, stop,
                             binhex_name(bytes(raw[body:min(stop, body + 400)])), BINHEX))
        at = stop
    found.sort(key=lambda p: p.start)
    # Overlapping blocks (a uuencoded yEnc text...): the first one holds the rest.
    kept: list[Part] = []
    for pseudo in found:
        if not kept or pseudo.start >= kept[-1].end:
            kept.append(pseudo)
    return kept


def encoded_text_holds_file(raw: Raw, part: Part, pieces: Iterator[bytes]) -> bool:
    """A base64 or quoted-printable text part whose text holds an encoded file: its block
    has no range on the wire to cut, so the caller takes the whole part."""
    cte = str(part.skeleton.get("Content-Transfer-Encoding", "") or "").strip().lower()
    if cte not in ("base64", "quoted-printable"):
        return False
    text = b"".join(pieces)
    return any(pattern.search(text) for pattern in (_UU_BEGIN, _Y_BEGIN, _HQX_START))


def _next_line(raw: Raw, at: int, end: int) -> int:
    lf = raw.find(b"\n", at, end)
    return end if lf < 0 else lf + 1


def _name(data: bytes) -> str:
    text = data.strip().strip(b'"')
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        return text.decode("cp932", "replace")


def _pseudo(raw: Raw, start: int, body_start: int, end: int, name: str, kind: str) -> Part:
    skeleton = EmailMessage(policy=email_policy.default)
    skeleton["Content-Type"] = ("application/mac-binhex40" if kind == BINHEX
                                else "application/octet-stream")
    skeleton.set_param("name", name or "attachment", header="Content-Type")
    skeleton["Content-Disposition"] = "attachment"
    skeleton.set_param("filename", name or "attachment", header="Content-Disposition")
    skeleton["Content-Transfer-Encoding"] = kind
    skeleton.set_payload("")
    body_start = min(body_start, end)
    # A BinHex block is kept whole (header line included) so the file can still be read.
    return Part(start, start if kind == BINHEX else body_start, end, skeleton,
                delimiter_at=start)


def is_embedded(part: Part) -> bool:
    return str(part.skeleton.get("Content-Transfer-Encoding", "")).lower() in (
        UUENCODE, YENC, BINHEX)


def decoded(raw: Raw, part: Part) -> Iterator[bytes]:
    """The file of a uuencode or yEnc block, line by line; a BinHex block as it stands."""
    kind = str(part.skeleton.get("Content-Transfer-Encoding", "")).lower()
    lines = bytes(raw[part.body_start:part.end]).splitlines()
    if kind == UUENCODE:
        for line in lines:
            if line.strip() in (b"end", b"`", b""):
                continue
            yield _uu_line(line)
    elif kind == YENC:
        for line in lines:
            if line.startswith((b"=yend", b"=ypart")):
                continue
            yield _yenc_line(line)
    else:
        yield bytes(raw[part.body_start:part.end])


def _uu_line(line: bytes) -> bytes:
    try:
        return binascii.a2b_uu(line)
    except binascii.Error:  # encoders that drop trailing spaces, or count wrongly
        count = (line[0] - 32) & 63
        body = line[1:].rstrip(b"\r\n")
        body = body + b" " * (-(len(body)) % 4)
        try:
            return binascii.a2b_uu(bytes([32 + min(count, len(body) * 3 // 4)]) + body)
        except binascii.Error:
            return b""


_YENC = bytes((value - 42) % 256 for value in range(256))


def _yenc_line(line: bytes) -> bytes:
    """One line: every byte less 42; "=" escapes the next byte, which is 64 more again.
    By translate, not byte by byte: a yEnc post can be tens of megabytes."""
    first, *escaped = line.rstrip(b"\r\n").split(b"=")
    out = [first.translate(_YENC)]
    for piece in escaped:
        if piece:
            out.append(bytes([(piece[0] - 106) % 256]) + piece[1:].translate(_YENC))
    return b"".join(out)


def binhex_name(text: bytes) -> str:
    """The file name in a BinHex 4.0 header (the text from its opening colon on)."""
    bits = value = 0
    packed = bytearray()
    for char in text.lstrip(b":"):
        if char == 58:  # the closing colon
            break
        if char not in _HQX_VALUE:
            continue
        value = (value << 6) | _HQX_VALUE[char]
        bits += 6
        if bits >= 8:
            bits -= 8
            packed.append((value >> bits) & 0xFF)
    plain = bytearray()
    index = 0
    while index < len(packed):  # undo the run-length encoding (0x90 count)
        byte = packed[index]
        if byte == 0x90 and index + 1 < len(packed):
            count = packed[index + 1]
            if count == 0:
                plain.append(0x90)
            elif plain:
                plain += bytes([plain[-1]]) * (count - 1)
            index += 2
            continue
        plain.append(byte)
        index += 1
    if not plain or len(plain) < 1 + plain[0]:
        return ""
    return plain[1:1 + plain[0]].decode("mac-roman", "replace")
