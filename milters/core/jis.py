"""ISO-2022-JP with the Windows extensions (Microsoft's CP50220), both ways.

Japanese mail clients (Outlook, Becky!, Thunderbird on Windows) send ISO-2022-JP text that
contains NEC row 13 (①, ㈱, ㍻) and the NEC-selected IBM extensions (髙, 﨑). Python's
iso2022_jp codecs reject or mangle them, so we go through CP932 and do the Shift_JIS <->
JIS X 0208 arithmetic ourselves. IBM extensions (CP932 lead bytes 0xFA-0xFC) are sent in
their NEC-selected form (rows 89-92), as CP50220 does.
"""
from __future__ import annotations

from functools import lru_cache

ESC_JIS = b"\x1b$B"
ESC_ASCII = b"\x1b(B"


@lru_cache(maxsize=1)
def _ibm_to_nec() -> dict[bytes, bytes]:
    """CP932 IBM-extension code -> the NEC-selected code of the same character."""
    nec: dict[str, bytes] = {}
    for lead in (0xED, 0xEE):
        for trail in range(0x40, 0xFD):
            code = bytes((lead, trail))
            try:
                nec.setdefault(code.decode("cp932"), code)
            except UnicodeDecodeError:
                continue
    table = {}
    for lead in (0xFA, 0xFB, 0xFC):
        for trail in range(0x40, 0xFD):
            code = bytes((lead, trail))
            try:
                char = code.decode("cp932")
            except UnicodeDecodeError:
                continue
            if char in nec:
                table[code] = nec[char]
    return table


def _sjis_to_jis(lead: int, trail: int) -> bytes:
    row = ((lead - (0x71 if lead <= 0x9F else 0xB1)) << 1) + 1
    if trail > 0x7F:
        trail -= 1
    if trail >= 0x9E:
        return bytes((row + 1, trail - 0x7D))
    return bytes((row, trail - 0x1F))


def _jis_to_sjis(row: int, cell: int) -> bytes:
    lead = ((row + 1) >> 1) + 0x70
    if lead > 0x9F:
        lead += 0x40
    if row & 1:
        trail = cell + 0x1F
        if trail >= 0x7F:
            trail += 1
    else:
        trail = cell + 0x7E
    return bytes((lead, trail))


def encode_cp50220(text: str, errors: str = "strict") -> bytes:
    """Encode text as ISO-2022-JP with Windows extensions; half-width kana become ASCII-safe
    only if `errors` allows (CP50220 maps them to full width; we refuse rather than guess)."""
    out = bytearray()
    in_jis = False
    ibm = _ibm_to_nec()
    for char in text:
        if ord(char) < 0x80:
            if in_jis:
                out += ESC_ASCII
                in_jis = False
            out += char.encode("ascii")
            continue
        code = char.encode("cp932", errors=errors)
        if len(code) != 2:
            code = "\u3013".encode("cp932") if errors == "replace" else b""
            if not code:
                raise UnicodeEncodeError("cp50220", char, 0, 1, "no JIS X 0208 form")
        code = ibm.get(code, code)
        if not in_jis:
            out += ESC_JIS
            in_jis = True
        out += _sjis_to_jis(code[0], code[1])
    if in_jis:
        out += ESC_ASCII
    return bytes(out)


def decode_cp50220(data: bytes, errors: str = "replace") -> str:
    """Decode ISO-2022-JP including the Windows extensions."""
    parts: list[str] = []
    jis = False
    i = 0
    while i < len(data):
        if data.startswith((b"\x1b$B", b"\x1b$@"), i):
            jis, i = True, i + 3
        elif data.startswith((b"\x1b(B", b"\x1b(J"), i):
            jis, i = False, i + 3
        elif jis and i + 1 < len(data) and data[i] > 0x20 and data[i + 1] > 0x20:
            parts.append(_jis_to_sjis(data[i], data[i + 1]).decode("cp932", errors=errors))
            i += 2
        else:
            parts.append(bytes((data[i],)).decode("ascii", errors=errors))
            i += 1
    return "".join(parts)
