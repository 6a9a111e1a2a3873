"""The signing primitive shared by DKIM signing and ARC sealing (RFC 6376, RFC 8463, RFC 8617):
canonical body hash (streamed), header hash input, the signature bytes (OpenSSL through
`cryptography`, never dkimpy's pure-Python RSA), and a folded DKIM-Signature field.

API (the contract ARC sealing builds on):

    SigningKey(domain: str, selector: str, algorithm: "rsa-sha256" | "ed25519-sha256", private)
    BodyHasher(canon)            .feed(chunk) as the body arrives, .digest() -> sha256 digest
    canonical_body_hash(body: Iterable[bytes], canon: "relaxed" | "simple") -> bytes
    canonical_header(name, value, canon) -> bytes             one field, CRLF-terminated
    header_hash_input(fields, signed, canon, sig_field) -> bytes
        fields: the message's header fields top to bottom as (name, value) with value =
        the bytes after the colon (folding kept, no final CRLF); signed: the h= names in
        order; each name takes the next instance from the bottom, a name with no instance
        left adds nothing (over-signing); sig_field goes last, its b= value emptied, no CRLF.
    sign_bytes(key, data) -> bytes      rsa: PKCS#1 v1.5 over SHA-256(data);
                                        ed25519: Ed25519 over SHA-256(data) (RFC 8463 3)
    fold_tags(name, tags) -> bytes      "tag=value" list folded into a field value
    dkim_signature(key, fields, body_hash, *, signed_headers, oversign, canon, timestamp,
                   expire=None) -> (b"DKIM-Signature", folded value)
    h_list(fields, signed_headers, oversign) -> list[bytes]   the h= names actually used

Values are bytes; folded values use CRLF + TAB, so a caller handing them to a milter
library that wants LF turns CRLF into LF itself.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from milters.core.dkim_body import CANONS, CanonicalBody
from milters.core.dkim_keys import PrivateKey

Field = tuple[bytes, bytes]

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")

_WSP = re.compile(rb"[\t ]+")
_LINE_END = re.compile(rb"\r?\n")
_B_VALUE = re.compile(rb"(^|;)([\t \r\n]*b[\t \r\n]*=)[^;]*")


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" | "ed25519-sha256"
    private: PrivateKey

    def __post_init__(self) -> None:
        want = rsa.RSAPrivateKey if self.algorithm == "rsa-sha256" else ed25519.Ed25519PrivateKey
        if self.algorithm not in ALGORITHMS or not isinstance(self.private, want):
            raise ValueError(f"key {self.selector}._domainkey.{self.domain}: a "
                             f"{type(self.private).__name__} cannot sign {self.algorithm}")


class BodyHasher:
    """The SHA-256 of the canonical body (milters/core/dkim_body.py), fed raw chunks as
    they arrive; `length` counts the canonical bytes hashed so far."""

    def __init__(self, canon: str) -> None:
        self._hash = hashlib.sha256()
        self._body = CanonicalBody(canon, self._hash.update)
        self._done: bytes | None = None

    @property
    def length(self) -> int:
        return self._body.length

    def feed(self, chunk: bytes) -> None:
        if self._done is not None:
            raise ValueError("body fed after digest()")
        self._body.feed(chunk)

    def digest(self) -> bytes:
        if self._done is None:
            self._body.finish()
            self._done = self._hash.digest()
        return self._done


def canonical_body_hash(body: Iterable[bytes], canon: str) -> bytes:
    hasher = BodyHasher(canon)
    for chunk in body:
        hasher.feed(chunk)
    return hasher.digest()


def canonical_header(name: bytes, value: bytes, canon: str) -> bytes:
    if canon == "simple":
        return name + b":" + value + b"\r\n"
    if canon != "relaxed":
        raise ValueError(f"header canonicalization {canon!r}: not relaxed or simple")
    value = _WSP.sub(b" ", _LINE_END.sub(b"", value)).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value + b"\r\n"


def header_hash_input(fields: list[Field], signed: list[bytes], canon: str,
                      sig_field: Field) -> bytes:
    by_name: dict[bytes, list[Field]] = {}
    for field in fields:
        by_name.setdefault(field[0].strip(b" \t").lower(), []).append(field)
    out = []
    for name in signed:
        instances = by_name.get(name.lower())
        if instances:  # the next instance from the bottom (RFC 6376 5.4.2)
            field = instances.pop()
            out.append(canonical_header(field[0], field[1], canon))
    empty_b = _B_VALUE.sub(rb"\1\2", sig_field[1])
    out.append(canonical_header(sig_field[0], empty_b, canon)[:-2])
    return b"".join(out)


def sign_bytes(key: SigningKey, data: bytes) -> bytes:
    if isinstance(key.private, rsa.RSAPrivateKey):
        return key.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.private.sign(hashlib.sha256(data).digest())


def h_list(fields: list[Field], signed_headers: Iterable[str],
           oversign: Iterable[str]) -> list[bytes]:
    """Each wanted name once per instance present, plus once more when over-signed: that
    extra entry matches no field, so a field of that name added later breaks the signature."""
    present: dict[bytes, int] = {}
    for name, _ in fields:
        key = name.strip(b" \t").lower()
        present[key] = present.get(key, 0) + 1
    extra = {name.lower() for name in oversign}
    names: list[bytes] = []
    for name in dict.fromkeys(n.lower() for n in signed_headers):
        count = present.get(name.encode("ascii"), 0) + (1 if name in extra else 0)
        names.extend([name.encode("ascii")] * count)
    return names


def fold_tags(name: bytes, tags: list[tuple[bytes, bytes]], width: int = 76) -> bytes:
    """ "t1=v1; t2=v2" folded with CRLF TAB so no line passes `width`; h= breaks after its
    colons, bh= and b= (base64) anywhere: verifiers drop that whitespace. The last tag's
    value is appended by append_folded, so a value added later (b=) leaves every byte
    before it as it was when signed."""
    out = b""
    column = len(name) + 1
    for i, (tag, value) in enumerate(tags):
        end = b";" if i < len(tags) - 1 else b""
        if tag in (b"h", b"bh", b"b"):
            start = tag + b"="
            if column + 1 + len(start) + 8 > width:
                out, column = out + b"\r\n\t", 1
            else:
                out, column = out + b" ", column + 1
            out, column = out + start, column + len(start)
            units = value.split(b":") if tag == b"h" else [value]
            for j, unit in enumerate(units):
                out, column = append_folded(out, column, (b":" if j else b"") + unit, width,
                                            whole=tag == b"h")
            out, column = out + end, column + len(end)
            continue
        piece = tag + b"=" + value + end
        if column + 1 + len(piece) > width:
            out, column = out + b"\r\n\t" + piece, 1 + len(piece)
        else:
            out, column = out + b" " + piece, column + 1 + len(piece)
    return out


def append_folded(out: bytes, column: int, text: bytes, width: int = 76, *,
                  whole: bool = False) -> tuple[bytes, int]:
    """text added at `column`; a run that does not fit goes on in continuation lines (a
    base64 run is cut anywhere, an h= name is kept whole)."""
    if column + len(text) <= width:
        return out + text, column + len(text)
    if whole:
        return out + b"\r\n\t" + text, 1 + len(text)
    while text:
        room = max(width - column, 0)
        if room == 0:
            out, column = out + b"\r\n\t", 1
            continue
        out, column, text = out + text[:room], column + len(text[:room]), text[room:]
    return out, column


def dkim_signature(key: SigningKey, fields: list[Field], body_hash: bytes, *,
                   signed_headers: Iterable[str], oversign: Iterable[str],
                   canon: str = "relaxed/relaxed", timestamp: int,
                   expire: int | None = None) -> Field:
    header_canon, _, body_canon = canon.partition("/")
    if header_canon not in CANONS or (body_canon or "simple") not in CANONS:
        raise ValueError(f"canonicalization {canon!r}: not relaxed|simple/relaxed|simple")
    if expire is not None and expire <= timestamp:
        raise ValueError(f"x={expire} is not after t={timestamp}")
    names = h_list(fields, signed_headers, oversign)
    if b"from" not in names:
        raise ValueError("h= must sign From (RFC 6376 5.4)")
    tags = [(b"v", b"1"), (b"a", key.algorithm.encode()), (b"c", canon.encode()),
            (b"d", key.domain.encode("ascii")), (b"s", key.selector.encode("ascii")),
            (b"t", str(timestamp).encode())]
    if expire is not None:
        tags.append((b"x", str(expire).encode()))
    tags += [(b"h", b":".join(names)), (b"bh", base64.b64encode(body_hash)), (b"b", b"")]
    name = b"DKIM-Signature"
    unsigned = fold_tags(name, tags)
    data = header_hash_input(fields, names, header_canon, (name, unsigned))
    signature = base64.b64encode(sign_bytes(key, data))
    last = unsigned.rsplit(b"\n", 1)
    column = len(last[1]) if len(last) == 2 else len(name) + 1 + len(unsigned)
    return name, append_folded(unsigned, column, signature)[0]
