"""The DKIM/ARC body hashes computed chunk by chunk (milters/auth/body_hash.py) equal what
dkimpy computes from the whole body, for any body and any way of cutting it into chunks: a
difference would pass a tampered body or fail a good one."""
from __future__ import annotations

import hashlib
import time

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from milters.auth.body_hash import BodyHashes, HashKey, from_raw, wanted_keys

# Bodies made of the bytes canonicalization cares about, plus some ordinary ones.
BODY = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"\t", b"  \t", b"a", b"b c",
                                 b"\r\n\r\n", b"\x00", b"\xff", b".", b" \r"]),
                max_size=60).map(b"".join)
HEAD = b"From: a@example.org\r\nSubject: x\r\n\r\n"


def dkimpy_canonical(body: bytes, canon: bytes) -> bytes:
    """The canonical body as dkimpy makes it: its parser first, then its canonicalization."""
    _, parsed = dkim.rfc822_parse(HEAD + body)
    policy = CanonicalizationPolicy.from_c_value(b"simple/" + canon)
    return bytes(policy.canonicalize_body(parsed))


def fed(body: bytes, cuts: list[int], keys: list[HashKey]) -> BodyHashes:
    hashes = BodyHashes(keys)
    start = 0
    for cut in sorted(cut % (len(body) + 1) for cut in cuts) + [len(body)]:
        hashes.feed(body[start:cut])
        start = max(start, cut)
    return hashes


@settings(max_examples=1500, deadline=None)
@given(body=BODY, cuts=st.lists(st.integers(0, 400), max_size=8),
       canon=st.sampled_from([b"simple", b"relaxed"]), length=st.integers(0, 80))
def test_streamed_body_hash_equals_dkimpy_on_the_whole_body(
        body: bytes, cuts: list[int], canon: bytes, length: int) -> None:
    keys = [HashKey(canon, "sha256", None), HashKey(canon, "sha1", None),
            HashKey(canon, "sha256", length)]
    hashes = fed(body, cuts, keys)
    expected = dkimpy_canonical(body, canon)
    assert hashes.canonical_length(canon) == len(expected)
    assert hashes.digest(keys[0]) == hashlib.sha256(expected).digest()
    assert hashes.digest(keys[1]) == hashlib.sha1(expected).digest()
    assert hashes.digest(keys[2]) == hashlib.sha256(expected[:length]).digest()


def test_a_body_fed_one_byte_at_a_time_hashes_as_a_whole() -> None:
    body = b"  line one \t\r\n\tline\ttwo\r\r\n\n \r\n\r\n\r\n"
    for canon in (b"simple", b"relaxed"):
        key = HashKey(canon, "sha256", None)
        hashes = fed(body, list(range(len(body))), [key])
        assert hashes.digest(key) == hashlib.sha256(dkimpy_canonical(body, canon)).digest()


def test_a_hostile_body_costs_linear_time() -> None:
    """Long whitespace runs not followed by a line end, long runs of empty lines and long
    lines: dkimpy's own regexes backtrack on the first (quadratic); ours must not. Two
    megabytes of each stay well under a generous bound."""
    size = 2 * 1024 * 1024
    body = b" " * size + b"x\r\n" + b"\r\n" * (size // 2) + b"y" + b"\t \t" * (size // 3)
    keys = [HashKey(b"relaxed", "sha256", None), HashKey(b"simple", "sha256", None)]
    start = time.process_time()
    hashes = fed(body, list(range(0, len(body), 65535)), keys)
    hashes.finish()
    assert time.process_time() - start < 20, "hashing a 6 MB hostile body took too long"
    expected = b" x\r\n" + b"\r\n" * (size // 2) + b"y \r\n"
    assert hashes.digest(keys[0]) == hashlib.sha256(expected).digest()


def test_only_the_hashes_the_signatures_ask_for_are_computed() -> None:
    head = (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=a.example; s=s;\r\n"
            b" h=from; bh=AAAA; b=AAAA\r\n"
            b"DKIM-Signature: v=1; a=rsa-sha1; c=relaxed; l=10; d=b.example; s=s; h=from;"
            b" bh=AAAA; b=AAAA\r\n"
            b"DKIM-Signature: v=1; a=ed25519-sha256; d=c.example; s=s; h=from; bh=AAAA;"
            b" b=AAAA\r\n"
            b"ARC-Message-Signature: i=1; a=rsa-sha256; d=d.example; s=s; h=from; bh=AAAA;"
            b" b=AAAA\r\n"
            b"From: a@example.org\r\n\r\n")
    assert wanted_keys(head, 10) == {HashKey(b"simple", "sha256", None),
                                     HashKey(b"simple", "sha1", 10),
                                     HashKey(b"relaxed", "sha256", None)}
    # Past max_signatures nothing is hashed for DKIM (those signatures are not checked).
    assert wanted_keys(head, 1) == {HashKey(b"simple", "sha256", None),
                                    HashKey(b"relaxed", "sha256", None)}
    # No signature: the body is not hashed at all.
    unsigned = from_raw(b"From: a@example.org\r\n\r\n" + b"x" * 1000, 10)
    assert unsigned.body.digest(HashKey(b"simple", "sha256", None)) is None


@settings(max_examples=300, deadline=None)
@given(ends=st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=4, max_size=4), body=BODY,
       canon=st.sampled_from([b"simple", b"relaxed"]))
def test_a_whole_message_is_split_where_dkimpy_splits_it(
        ends: list[bytes], body: bytes, canon: bytes) -> None:
    """Header lines and the empty line ending them with CRLF or bare LF, and a body that
    may start with empty lines: the header section and the body hashed are dkimpy's."""
    raw = (b"DKIM-Signature: v=1; a=rsa-sha256; c=simple/" + canon + b"; d=a.example;"
           + ends[0] + b" s=s; h=from; bh=AAAA; b=AAAA" + ends[1]
           + b"From: a@example.org" + ends[2] + ends[3] + body)
    parts = from_raw(raw, 10, piece=7)
    headers, parsed_body = dkim.rfc822_parse(raw)
    assert dkim.rfc822_parse(parts.head)[0] == headers
    expected = CanonicalizationPolicy.from_c_value(b"simple/" + canon).canonicalize_body(
        parsed_body)
    assert parts.body.digest(HashKey(canon, "sha256", None)) == hashlib.sha256(expected).digest()
