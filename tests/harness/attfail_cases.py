"""Hostile and broken MIME for the attachments milter's fail-closed checks: each case hides
files where a careless reader would take them for body text. A case names every file it
holds, as it appears on the wire and decoded; after "encrypt everything" each must be inside
the ZIP (a ZIP entry equal to the decoded file, or an entry holding the wire bytes, for parts
and messages that go into the ZIP as they came), and in no other part of the output.

(The shared set of issue 14, tests/harness/mime_torture.py, is built by another helper; these
are the attachments milter's own focused cases.)"""
from __future__ import annotations

import base64
import binascii
import re
import subprocess
from dataclasses import dataclass
from email import message_from_bytes
from email import policy as email_policy
from pathlib import Path

HEAD = (b"From: hanako@example.jp\r\nTo: buyer@customer.example\r\nSubject: files\r\n"
        b"Message-ID: <fail.closed@example.jp>\r\nMIME-Version: 1.0\r\n")


@dataclass(frozen=True)
class Hidden:
    wire: bytes  # the file's bytes as they are in the message
    data: bytes  # the file itself


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    hidden: tuple[Hidden, ...]


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def _uu(name: str, data: bytes) -> bytes:
    lines = [f"begin 644 {name}".encode()]
    lines += [binascii.b2a_uu(data[i:i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
    return b"\r\n".join(lines + [b"`", b"end"]) + b"\r\n"


def _file(n: int) -> bytes:
    # Deterministic, not text: a change of a byte anywhere shows.
    return bytes((n * 7 + i * 13) % 256 for i in range(300 + n * 41))


def _b64_file(n: int) -> Hidden:
    data = _file(n)
    return Hidden(_b64(data), data)


def _multipart(header: bytes, body: bytes) -> bytes:
    return HEAD + header + b"\r\n" + body


TEXT = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHello, the files.\r\n"


def _attachment(hidden: Hidden, name: str = "a.bin") -> bytes:
    return (f"Content-Type: application/octet-stream; name={name}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + hidden.wire


def build_cases() -> list[Case]:
    cases = []
    f1, f2 = _b64_file(1), _b64_file(2)
    # The boundary in RFC 2231 continuations: a reader that misses it sees one opaque part.
    cases.append(Case("rfc2231-boundary", _multipart(
        b'Content-Type: multipart/mixed; boundary*0="abc"; boundary*1="def"\r\n',
        b"--abcdef\r\n" + TEXT + b"--abcdef\r\n" + _attachment(f1) + b"--abcdef--\r\n"),
        (f1,)))
    cases.append(Case("missing-final-boundary", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\n" + _attachment(f1)), (f1,)))
    cases.append(Case("no-opening-delimiter", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--c\r\n" + TEXT + b"--c\r\n" + _attachment(f1) + b"--c--\r\n"), (f1,)))
    cases.append(Case("multipart-without-boundary", _multipart(
        b"Content-Type: multipart/mixed\r\n",
        b"--b\r\n" + TEXT + b"--b\r\n" + _attachment(f1) + b"--b--\r\n"), (f1,)))
    inner = b"--b\r\n" + TEXT + b"--b\r\n" + _attachment(f2) + b"--b--\r\n"
    cases.append(Case("base64-encoded-multipart", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\nContent-Transfer-Encoding: base64\r\n",
        _b64(inner)), (Hidden(_b64(inner), inner),)))
    uu = _file(3)
    cases.append(Case("uuencode-in-a-text-part", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\nContent-Type: text/plain\r\n\r\n" + _uu("x.bin", uu)
        + b"--b--\r\n"), (Hidden(_uu("x.bin", uu), uu),)))
    cases.append(Case("uuencode-single-part", HEAD + b"Content-Type: text/plain\r\n\r\n"
                      b"See below.\r\n\r\n" + _uu("y.bin", uu), (Hidden(_uu("y.bin", uu), uu),)))
    cases.append(Case("unknown-transfer-encoding", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: x-uuencode\r\n\r\n" + _uu("z.bin", uu) + b"--b--\r\n"),
        (Hidden(_uu("z.bin", uu), uu),)))
    yenc = b"=ybegin line=128 size=5 name=y.bin\r\nabcde\r\n=yend size=5\r\n"
    cases.append(Case("yenc-in-text", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\nContent-Type: text/plain\r\n\r\n" + yenc + b"--b--\r\n"),
        (Hidden(yenc, yenc),)))
    binhex = (b"(This file must be converted with BinHex 4.0)\r\n"
              b":$f*TEQKPH#jdCA0d,R4iG!\"849K88(0$9!!!!!!!!!!!!!!!!!!!!!!!!!!!:\r\n")
    cases.append(Case("binhex-in-text", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\nContent-Type: text/plain\r\n\r\n" + binhex + b"--b--\r\n"),
        (Hidden(binhex, binhex),)))
    # No blank line between the part's header and its base64 body.
    cases.append(Case("no-blank-line-after-part-header", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: base64\r\n" + f2.wire + b"--b--\r\n"), (f2,)))
    broken = b"!!" + f2.wire[:40] + b"*" + f2.wire[40:]
    cases.append(Case("invalid-base64-text", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + broken + b"--b--\r\n"),
        (Hidden(broken, broken),)))
    # Two Content-Types: the stdlib reads the first, other clients the last.
    cases.append(Case("two-content-types", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\nContent-Type: text/plain\r\n"
        b"Content-Type: application/x-msdownload; name=run.exe\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + f1.wire + b"--b--\r\n"), (f1,)))
    cases.append(Case("content-type-not-a-type", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\nContent-Type: application; name=x.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + f1.wire + b"--b--\r\n"), (f1,)))
    embedded = (b"From: a@example.jp\r\nSubject: inner\r\nContent-Type: application/pdf\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n" + f2.wire)
    cases.append(Case("digest-part-without-content-type", _multipart(
        b"Content-Type: multipart/digest; boundary=b\r\n",
        b"--b\r\n\r\n" + embedded + b"--b--\r\n"), (Hidden(embedded, embedded),)))
    partial = (b"Content-Type: message/partial; id=\"x@example.jp\"; number=1; total=2\r\n\r\n"
               + b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               + f1.wire)
    cases.append(Case("message-partial", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"--b\r\n" + TEXT + b"--b\r\n" + partial + b"--b--\r\n"), (f1,)))
    # Bare CR line ends past the top-level header: clients that take CR as a line end see a
    # multipart with a file; a CRLF-only reader sees one line of text.
    bare = (b"--b\r" + TEXT.replace(b"\r\n", b"\r") + b"--b\r"
            + _attachment(f1).replace(b"\r\n", b"\r") + b"--b--\r")
    cases.append(Case("bare-cr-line-ends", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n", bare),
        (Hidden(f1.wire.replace(b"\r\n", b"\r"), f1.data),)))
    uu_pre = _uu("pre.bin", uu)
    cases.append(Case("uuencode-in-the-preamble", _multipart(
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        uu_pre + b"--b\r\n" + TEXT + b"--b--\r\n"), (Hidden(uu_pre, uu),)))
    # Nested deeper than the scan follows, a file at the bottom.
    depth = 60
    body = _attachment(f2)
    for level in range(depth, 0, -1):
        body = (f"Content-Type: multipart/mixed; boundary=d{level}\r\n\r\n--d{level}\r\n"
                .encode() + body + f"--d{level}--\r\n".encode())
    cases.append(Case("nested-60-deep", HEAD + body, (f2,)))
    return cases


CASES = build_cases()


def password_from(text: str) -> str:
    """The line after the ■パスワード heading of the ja notice."""
    found = re.search(r"■パスワード\s*\n\s*(\S+)", text)
    assert found, text
    return found.group(1)


def notice_password(raw: bytes) -> str:
    from milters.core.jis import decode_cp50220
    message = message_from_bytes(raw, policy=email_policy.default)
    data = message.get_payload(decode=True)
    assert isinstance(data, bytes)
    charset = (message.get_content_charset() or "").lower()
    return password_from(decode_cp50220(data) if charset == "iso-2022-jp"
                         else data.decode(charset or "utf-8"))


def open_zip(data: bytes, password: str, tmp: Path) -> list[bytes]:
    """Every entry of the ZIP, opened with 7z."""
    tmp.mkdir(parents=True, exist_ok=True)
    archive = tmp / "in.zip"
    archive.write_bytes(data)
    done = subprocess.run(["7z", "x", "-y", f"-p{password}", f"-o{tmp}/out", str(archive)],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return [p.read_bytes() for p in sorted((tmp / "out").rglob("*")) if p.is_file()]


def zip_and_clear(output: bytes) -> tuple[bytes | None, bytes]:
    """The ZIP part's decoded bytes, and every other byte of the output (headers, texts,
    notes) decoded where they are encoded: what a reader sees without the password."""
    message = message_from_bytes(output, policy=email_policy.default)
    archive, clear = None, [output.split(b"\r\n\r\n", 1)[0]]
    for part in message.walk():
        if part.is_multipart():
            continue
        data = part.get_payload(decode=True) or b""
        if data[:4] == b"PK\x03\x04" and archive is None:
            archive = data
            continue
        clear.append(data)
        clear.append(part.get_payload(decode=False).encode("utf-8", "surrogateescape")
                     if isinstance(part.get_payload(decode=False), str) else b"")
    return archive, b"\n".join(clear)


def check_protected(case: Case, output: bytes, password: str, tmp: Path) -> None:
    """Every hidden file is inside the ZIP, none in the clear part of the output."""
    archive, clear = zip_and_clear(output)
    assert archive is not None, f"{case.name}: no ZIP in\n{output[:2000]!r}"
    entries = open_zip(archive, password, tmp)
    for hidden in case.hidden:
        # (the CRLF before a delimiter belongs to the delimiter, RFC 2046 5.1.1)
        assert any(entry == hidden.data or hidden.wire.rstrip(b"\r\n") in entry
                   for entry in entries), \
            f"{case.name}: a file is missing from the ZIP ({[len(e) for e in entries]})"
        for probe in (hidden.data[:64], hidden.wire[:64].strip()):
            if len(probe) >= 16:
                assert probe not in clear, f"{case.name}: a file left in the clear"
