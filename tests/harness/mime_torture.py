"""A MIME torture set: hostile and broken messages, each with the files it carries.

Built by code (no corpus on disk), deterministic, shared by every test that must show that a
file never leaves in the clear because the parser did not understand the part around it.

API
---
``torture_set() -> dict[str, TortureMessage]``
    Every named case (see ``CASES`` for the names and what each one breaks). A
    ``TortureMessage`` has ``name``, ``raw`` (the message as bytes, exactly as a hostile
    sender would send it: line ends are NOT normalised) and ``files``: a tuple of
    ``ExpectedFile(name, data, kind)`` in document order, where

    * ``data`` is the file's bytes once every encoding is undone (base64, quoted-printable,
      uuencode, yEnc). What a ZIP built from the message must hold, byte for byte;
    * ``name`` is the file name a mail client shows (``None``: not checked, e.g. a forwarded
      message named after its Subject);
    * ``kind`` is ``"file"``, ``"message"`` (an attached/digest message: ``data`` is the
      embedded message as it stands in ``raw``, CRLF line ends) or ``"binhex"`` (BinHex 4.0
      is recognised but kept encoded: ``data`` is the BinHex text itself, CRLF line ends).

Every text part carries ``LINKS`` (a URL, a URL nested in its query, a bare www. name) and
the ``html_active`` case ``ACTIVE_HTML`` (script, handlers, refresh, frames, a form,
javascript: links, remote pictures and style), for the neutralize milter's proof.

``mime_trees() -> hypothesis strategy of TortureMessage``
    Random MIME trees (multipart/mixed, alternative, related, digest; files in base64,
    quoted-printable, uuencode and yEnc; attached messages) mangled in the ways a reader
    must tolerate: RFC 2231 boundaries, line ends CRLF / LF / CR / mixed, a missing final
    delimiter, a base64 part without the blank line after its headers, a UTF-8 BOM, 8-bit
    and NUL bytes in headers. ``files`` says what must be found, as above.

``mangled_bytes() -> hypothesis strategy of bytes``
    ``mime_trees()`` output cut, spliced and overwritten at random: only "never raises, never
    hangs" can be asserted on these.

``uuencode(name, data)``, ``yencode(name, data)``, ``binhex(name, data)`` build the encoded
blocks (CRLF line ends) for tests that want their own cases.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from hypothesis import strategies as st

CRLF = b"\r\n"


@dataclass(frozen=True)
class ExpectedFile:
    name: str | None
    data: bytes
    kind: str = "file"


@dataclass(frozen=True)
class TortureMessage:
    name: str
    raw: bytes
    files: tuple[ExpectedFile, ...]


# --- encoders ------------------------------------------------------------------------------

def payload(seed: int, size: int) -> bytes:
    """Deterministic file content with every byte value (NUL, CR, LF, '=' included)."""
    head = f"file-{seed}:".encode()
    body = bytes((seed * 131 + i * 7 + (i >> 8)) % 256 for i in range(max(0, size - len(head))))
    return (head + body)[:size]


def b64(data: bytes, width: int = 76) -> bytes:
    text = base64.b64encode(data)
    return CRLF.join(text[i:i + width] for i in range(0, len(text), width)) + CRLF


def uuencode(name: str, data: bytes, mode: str = "644") -> bytes:
    lines = [f"begin {mode} {name}".encode()]
    lines += [binascii.b2a_uu(data[i:i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
    return CRLF.join(lines + [b"`", b"end"]) + CRLF


def yencode(name: str, data: bytes, line: int = 128) -> bytes:
    out, row = [], bytearray()
    for byte in data:
        value = (byte + 42) % 256
        if value in (0, 10, 13, 61) or (not row and value in (9, 32, 46)):
            row += bytes((61, (value + 64) % 256))
        else:
            row.append(value)
        if len(row) >= line:
            out.append(bytes(row))
            row = bytearray()
    if row:
        out.append(bytes(row))
    crc = binascii.crc32(data)
    return CRLF.join([f"=ybegin line={line} size={len(data)} name={name}".encode()] + out
                     + [f"=yend size={len(data)} crc32={crc:08x}".encode()]) + CRLF


_HQX = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"


def binhex(name: str, data: bytes) -> bytes:
    """BinHex 4.0 (no run-length compression needed: 0x90 is escaped as 0x90 0x00)."""
    def crc(block: bytes) -> bytes:
        return binascii.crc_hqx(block + b"\0\0", 0).to_bytes(2, "big")
    raw_name = name.encode("latin-1")
    header = (bytes([len(raw_name)]) + raw_name + b"\0" + b"BINA" + b"????" + b"\0\0"
              + len(data).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    stream = header + crc(header) + data + crc(data) + crc(b"")
    stream = stream.replace(b"\x90", b"\x90\x00")
    bits = "".join(f"{byte:08b}" for byte in stream)
    bits += "0" * (-len(bits) % 6)
    text = bytes(_HQX[int(bits[i:i + 6], 2)] for i in range(0, len(bits), 6))
    text = b":" + text + b":"
    rows = [text[i:i + 64] for i in range(0, len(text), 64)]
    return CRLF.join([b"(This file must be converted with BinHex 4.0)", b""] + rows) + CRLF


# --- building blocks -----------------------------------------------------------------------

def _file_part(name: str, data: bytes, ctype: str = "application/octet-stream") -> bytes:
    return (f"Content-Type: {ctype}; name=\"{name}\"\r\n"
            f"Content-Disposition: attachment; filename=\"{name}\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + b64(data)


# Links a neutralize milter must defang: plain, nested in another's query, bare www.
LINKS = ("https://files.example.net/get?u=http://evil.example.org/x and"
         " www.example.org/docs")


def _text_part(text: str = "Hello, see the attached files: " + LINKS) -> bytes:
    return b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + text.encode() + CRLF


def _multipart(ctype_line: bytes, boundary: bytes, parts: list[bytes], *,
               close: bool = True, headers: bytes = b"") -> bytes:
    body = b"".join(b"--" + boundary + CRLF + part + CRLF for part in parts)
    return (headers + ctype_line + CRLF + CRLF + b"This is a multi-part message.\r\n" + body
            + (b"--" + boundary + b"--" + CRLF if close else b""))


# Everything in HTML that acts on its own or fetches: script, handlers, refresh, frames,
# forms, javascript: links, remote pictures and style sheets.
ACTIVE_HTML = (
    b"<html><head><meta http-equiv=\"refresh\" content=\"0;url=http://meta.example.org/\">"
    b"<script>location='http://script.example.org/'</script><style>body{background:"
    b"url(http://css.example.org/x.png)}</style></head><body onload=\"go()\">"
    b"<a href=\"https://click.example.org/r?u=http://evil.example.org/\">statement</a>"
    b"<img src=\"http://img.example.org/t.gif\"><iframe src=\"http://frame.example.org/\">"
    b"</iframe><form action=\"http://form.example.org/\"><input name=p></form>"
    b"<a href=\"javascript:alert(1)\">run</a><object data=\"http://obj.example.org/\">"
    b"</object><svg onload=\"go()\"></svg></body></html>\r\n")

_TOP = b"From: a@example.jp\r\nTo: b@example.com\r\nSubject: files\r\nMIME-Version: 1.0\r\n"


def _mixed(parts: list[bytes], boundary: bytes = b"=_b1", **kw: object) -> bytes:
    return _multipart(b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"",
                      boundary, parts, headers=kw.pop("headers", _TOP), **kw)  # type: ignore


def _one_file(seed: int, name: str, size: int = 3000) -> tuple[bytes, ExpectedFile]:
    data = payload(seed, size)
    return _file_part(name, data), ExpectedFile(name, data)


def _line_ends(raw: bytes, end: bytes) -> bytes:
    return raw.replace(CRLF, end)


def _embedded(subject: str, seed: int) -> bytes:
    return (f"From: c@example.org\r\nSubject: {subject}\r\nMessage-ID: <{seed}@example.org>\r\n"
            f"\r\nDigest entry {seed}: http://digest{seed}.example.org/\r\n").encode()


# --- the cases -----------------------------------------------------------------------------

def _cases() -> list[TortureMessage]:
    cases: list[TortureMessage] = []

    def add(name: str, raw: bytes, *files: ExpectedFile) -> None:
        cases.append(TortureMessage(name, raw, tuple(files)))

    part, f1 = _one_file(1, "report.pdf")
    text = _text_part()
    boundary = b"=_part_one-two"
    add("rfc2231_boundary_continuations", _multipart(
        b"Content-Type: multipart/mixed;\r\n boundary*0*=us-ascii'en'%3D_part;\r\n"
        b" boundary*1*=_one%2Dtwo", boundary, [text, part], headers=_TOP), f1)
    add("rfc2231_boundary_plain_continuations", _multipart(
        b"Content-Type: multipart/mixed; boundary*0=\"=_part\"; boundary*1=\"_one-two\"",
        boundary, [text, part], headers=_TOP), f1)
    add("rfc2231_boundary_charset", _multipart(
        b"Content-Type: multipart/mixed; boundary*=utf-8''%3D_part_one-two",
        boundary, [text, part], headers=_TOP), f1)
    data = payload(2, 1500)
    add("rfc2231_filename_forms", _mixed([text, (
        b"Content-Type: application/octet-stream; name*0*=utf-8''%E8%A6%8B%E7%A9%8D;"
        b" name*1=\".pdf\"\r\nContent-Disposition: attachment; filename*=UTF-8'ja'"
        b"%E8%A6%8B%E7%A9%8D.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64(data))]),
        ExpectedFile("見積.pdf", data))

    digest = [_embedded("first entry", 11), _embedded("second entry", 12)]
    add("digest_without_content_type", _multipart(
        b"Content-Type: multipart/digest; boundary=\"dg\"", b"dg",
        [CRLF + d for d in digest], headers=_TOP),
        *(ExpectedFile(None, d, "message") for d in digest))

    data = payload(3, 900)
    add("missing_content_type_named", _mixed([text, (
        b"Content-Disposition: attachment; filename=\"notes.bin\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(data))]),
        ExpectedFile("notes.bin", data))

    part2, f2 = _one_file(4, "sheet.xlsx", 5000)
    mixed = _mixed([text, part, part2])
    add("bare_cr", _line_ends(mixed, b"\r"), f1, f2)
    add("bare_lf", _line_ends(mixed, b"\n"), f1, f2)
    lines = mixed.split(CRLF)
    add("mixed_line_ends", b"".join(line + (CRLF, b"\n", b"\r")[i % 3]
                                    for i, line in enumerate(lines[:-1])) + lines[-1], f1, f2)

    data = payload(5, 2000)
    add("base64_without_blank_line", _mixed([text, (
        b"Content-Type: application/pdf; name=\"scan.pdf\"\r\n"
        b"Content-Disposition: attachment; filename=\"scan.pdf\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n" + b64(data))]), ExpectedFile("scan.pdf", data))

    data = payload(6, 2500)
    add("uuencode_in_text", _TOP + b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        b"Here is the file.\r\n\r\n" + uuencode("ledger.xls", data) + b"\r\nBye.\r\n",
        ExpectedFile("ledger.xls", data))
    data2 = payload(7, 400)
    add("uuencode_two_in_multipart_text", _mixed([
        b"Content-Type: text/plain\r\n\r\nTwo files:\r\n" + uuencode("a.bin", data)
        + uuencode("b b.txt", data2, "600") + b"done\r\n"]),
        ExpectedFile("a.bin", data), ExpectedFile("b b.txt", data2))

    data = payload(8, 1200)
    block = binhex("macfile.sit", data)
    add("binhex_in_text", _TOP + b"Content-Type: text/plain\r\n\r\nMac file:\r\n\r\n" + block,
        ExpectedFile("macfile.sit", block.rstrip(CRLF), "binhex"))

    data = payload(9, 3000)
    add("yenc_in_text", _TOP + b"Content-Type: text/plain\r\n\r\nyEnc post\r\n"
        + yencode("photo.jpg", data) + b"\r\n", ExpectedFile("photo.jpg", data))

    add("header_name_non_utf8", _mixed([text, part], headers=_TOP + b"X-Caf\xe9-\xff: yes\r\n"
        b"X-\xc3\x28: broken utf-8\r\n"), f1)
    add("subject_200k", _mixed([text, part], headers=_TOP.replace(
        b"Subject: files", b"Subject: " + b" ".join([b"word%04d" % (i % 9999)
                                                      for i in range(200 * 1024 // 9)]))), f1)
    folded_to = b",\r\n ".join(b"user%05d@example.com" % i for i in range(135 * 1024 // 23))
    add("to_135k", _mixed([text, part], headers=_TOP.replace(b"To: b@example.com",
                                                              b"To: " + folded_to)), f1)
    add("continuation_without_indent", _mixed([text, part], headers=_TOP.replace(
        b"Subject: files\r\n", b"Subject: files for the\r\nmeeting of monday\r\n")), f1)
    add("non_ascii_message_id", _mixed([text, part], headers=_TOP + "Message-ID: "
        "<abc.123@example.срб>\r\nReferences: <x@пример.рф>\r\n".encode()), f1)
    add("utf8_bom", b"\xef\xbb\xbf" + _mixed([text, part]), f1)

    inner_part, deep = _one_file(10, "deep.doc", 700)
    node = inner_part
    for level in range(50):
        bnd = b"lvl%02d" % level
        node = _multipart(b"Content-Type: multipart/mixed; boundary=" + bnd, bnd, [node])
    add("nested_50_deep", _mixed([text, node]), deep)

    add("missing_final_boundary", _mixed([text, part, part2], close=False), f1, f2)

    data = payload(12, 4000)
    encoded = b64(data)
    bnd = encoded[10:30]  # a piece of the base64 text itself
    add("boundary_inside_base64", _multipart(
        b"Content-Type: multipart/mixed; boundary=\"" + bnd + b"\"", bnd,
        [text, b"Content-Type: application/octet-stream; name=\"in.bin\"\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded], headers=_TOP),
        ExpectedFile("in.bin", data))

    inner = _multipart(b"Content-Type: multipart/mixed; boundary=\"same\"", b"same",
                       [part2])
    add("duplicate_boundaries", _multipart(b"Content-Type: multipart/mixed; boundary=\"same\"",
                                           b"same", [text, inner, part], headers=_TOP), f2, f1)

    data = b"\0\0\0binary\0with NULs\0" * 40
    add("nul_bytes", _mixed([b"Content-Type: text/plain\r\n\r\nnul\0in\0text\r\n",
                             b"Content-Type: application/octet-stream; name=\"n\0ul.bin\"\r\n"
                             b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(data)],
                            headers=_TOP + b"X-Nul: a\0b\r\n"), ExpectedFile(None, data))

    data = payload(13, 800)
    add("eight_bit_headers", _mixed([
        "Content-Type: text/plain; charset=utf-8\r\n\r\n本文です\r\n".encode(),
        b"Content-Type: application/octet-stream; name=\"" + "資料.txt".encode("cp932")
        + b"\"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64(data)],
        headers=_TOP.replace(b"Subject: files", "Subject: 資料の送付".encode())
        + b"X-Latin: caf\xe9\r\n"), ExpectedFile("資料.txt", data))

    data = payload(14, 300 * 1024)
    add("very_long_lines", _mixed([
        b"Content-Type: text/plain\r\n\r\n" + b"x" * 100_000 + CRLF,
        b"Content-Type: application/zip; name=\"long.zip\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(data) + CRLF]),
        ExpectedFile("long.zip", data))

    data = payload(16, 1800)
    add("html_active", _mixed([_multipart(
        b"Content-Type: multipart/alternative; boundary=\"alt\"", b"alt",
        [_text_part(), b"Content-Type: text/html; charset=utf-8\r\n\r\n" + ACTIVE_HTML]),
        _file_part("invoice.html.zip", data)]), ExpectedFile("invoice.html.zip", data))

    data = payload(15, 600)
    add("quoted_printable_file", _mixed([text, (
        b"Content-Type: application/octet-stream; name=\"qp.bin\"\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        + binascii.b2a_qp(data, istext=False).replace(b"\n", CRLF))]), ExpectedFile("qp.bin", data))
    return cases


CASES: tuple[str, ...] = tuple(case.name for case in _cases())


def torture_set() -> dict[str, TortureMessage]:
    return {case.name: case for case in _cases()}


# --- random trees --------------------------------------------------------------------------

_NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,11}\.(pdf|bin|txt|docx)", fullmatch=True)


@st.composite
def _leaf(draw: st.DrawFn, seed: int) -> tuple[bytes, list[ExpectedFile]]:
    kind = draw(st.sampled_from(["text", "b64", "qp", "uu", "yenc", "message"]))
    data = payload(seed, draw(st.integers(0, 2000)))
    name = draw(_NAMES)
    if kind == "text":
        return _text_part(draw(st.text("abc xyz\r\n=-", max_size=80)).replace("\r", "")
                          .replace("\n", " ") + " " + LINKS), []
    if kind == "b64":
        squeeze = draw(st.booleans())  # headers run straight into the body
        part = _file_part(name, data)
        if squeeze and data:
            part = part.replace(b"base64\r\n\r\n", b"base64\r\n", 1)
        return part, [ExpectedFile(name, data)]
    if kind == "qp":
        return (f"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;"
                f" filename=\"{name}\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                .encode() + binascii.b2a_qp(data, istext=False).replace(b"\n", CRLF)), [
                    ExpectedFile(name, data)]
    if kind in ("uu", "yenc"):
        block = uuencode(name, data) if kind == "uu" else yencode(name, data)
        return b"Content-Type: text/plain\r\n\r\nfile below\r\n" + block, [
            ExpectedFile(name, data)]
    embedded = _embedded(f"fwd {seed}", seed)
    return b"Content-Type: message/rfc822\r\n\r\n" + embedded, [
        ExpectedFile(None, embedded, "message")]


@st.composite
def _tree(draw: st.DrawFn, depth: int = 0) -> tuple[bytes, list[ExpectedFile]]:
    seed = draw(st.integers(0, 10_000))
    if depth >= 4 or not draw(st.booleans()):
        return draw(_leaf(seed))
    count = draw(st.integers(1, 4))
    children = [draw(_tree(depth + 1)) for _ in range(count)]
    boundary = f"=_d{depth}_{seed}".encode()
    form = draw(st.sampled_from(["plain", "quoted", "2231", "2231-continued"]))
    param = {"plain": b"boundary=" + boundary,
             "quoted": b"boundary=\"" + boundary + b"\"",
             "2231": b"boundary*=us-ascii''" + boundary.replace(b"=", b"%3D"),
             "2231-continued": b"boundary*0=\"" + boundary[:3] + b"\";\r\n boundary*1=\""
                               + boundary[3:] + b"\""}[form]
    files = [file for _, found in children for file in found]
    subtype = draw(st.sampled_from(["mixed", "mixed", "related", "alternative"]))
    if subtype != "mixed":  # only in mixed are all children files for sure
        subtype = "mixed" if files else subtype
    return _multipart(b"Content-Type: multipart/" + subtype.encode() + b"; " + param,
                      boundary, [part for part, _ in children],
                      close=depth > 0 or draw(st.booleans())), files


@st.composite
def mime_trees(draw: st.DrawFn) -> TortureMessage:
    body, files = draw(_tree())
    top = draw(st.sampled_from([_TOP, b"\xef\xbb\xbf" + _TOP, _TOP + b"X-Bad\xff: \x80\0\r\n",
                                _TOP + "Message-ID: <é@例え.jp>\r\n".encode()]))
    raw = top + body
    end = draw(st.sampled_from([CRLF, b"\n", b"\r", b"mixed"]))
    if end == b"mixed":
        lines = raw.split(CRLF)
        ends = draw(st.lists(st.sampled_from([CRLF, b"\n", b"\r"]), min_size=len(lines),
                             max_size=len(lines)))
        out = bytearray()
        for line, e, following in zip(lines, ends, lines[1:]):
            # CR, then an empty line ended by LF, would read as one CRLF: not what we meant
            out += line + (CRLF if e == b"\r" and not following else e)
        raw = bytes(out) + lines[-1]
    elif end != CRLF:
        raw = raw.replace(CRLF, end)
    return TortureMessage("generated", raw, tuple(files))


@st.composite
def mangled_bytes(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(mime_trees()).raw)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["cut", "splice", "overwrite", "duplicate"]))
        at = draw(st.integers(0, len(raw)))
        if op == "cut":
            del raw[at:at + draw(st.integers(1, 200))]
        elif op == "splice":
            raw[at:at] = draw(st.sampled_from([b"\r\n--", b"\r\n\r\n", b"\0", b"\xff\xfe",
                                               b"\r", b"\n", b"begin 644 x\r\n", b"=ybegin ",
                                               b"Content-Type: multipart/mixed; boundary=",
                                               b"*0*=''%", b"\r\n "]))
        elif op == "overwrite":
            raw[at:at + 4] = draw(st.binary(min_size=1, max_size=4))
        else:
            raw[at:at] = raw[max(0, at - 300):at]
    return bytes(raw)
