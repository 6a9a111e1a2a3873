"""The shared signing primitive against two verifiers that are not ours: dkimpy's own
canonicalization (byte for byte, any chunking) and dkimpy's verifier."""
from __future__ import annotations

import base64
import hashlib
import random
import re

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed, Simple

from milters.sign.dkim_sign import (BodyHasher, SigningKey, canonical_body_hash,
                                    dkim_signature, h_list, header_hash_input)

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED = ed25519.Ed25519PrivateKey.generate()
SIGNED = ["from", "to", "cc", "subject", "date", "message-id", "reply-to"]
OVER = ["from", "to", "cc", "subject", "date", "message-id", "reply-to"]


def _dns() -> dict[bytes, bytes]:
    der = RSA.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = ED.public_key().public_bytes(serialization.Encoding.Raw,
                                       serialization.PublicFormat.Raw)
    return {b"r._domainkey.example.com.": b"v=DKIM1; k=rsa; p=" + base64.b64encode(der),
            b"e._domainkey.example.com.": b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)}


DNS = _dns()
KEYS = [SigningKey("example.com", "r", "rsa-sha256", RSA),
        SigningKey("example.com", "e", "ed25519-sha256", ED)]


def fields_of(head: bytes) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + b"\r\n" + line)
        elif line:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields


def sign(message: bytes, key: SigningKey, canon: str = "relaxed/relaxed") -> bytes:
    head, body = message.split(b"\r\n\r\n", 1)
    body_hash = canonical_body_hash([body], canon.split("/")[1])
    name, value = dkim_signature(key, fields_of(head), body_hash, signed_headers=SIGNED,
                                 oversign=OVER, canon=canon, timestamp=1796560000)
    return name + b":" + value + b"\r\n" + message


def verify(message: bytes) -> bool:
    return bool(dkim.verify(message, dnsfunc=lambda name, timeout=5: DNS.get(name)))


MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
           b"Subject: =?UTF-8?B?5pel5pys6Kqe?=  and\r\n\t a fold \r\n"
           b"Date: Sun, 6 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\n"
           b"Hello  \t world \r\n\r\nline\r\n\r\n\r\n")

BODIES = [b"", b"\r\n", b"\r\n\r\n", b"a", b"a\r\n", b" \t \r\n", b"a \r\n \r\n\r\n",
          b"x\ry\r\n", b"\r\r\n\r\n", b"a\nb\n\n", b"a \r", b"end  ", b"\t\r\n a\t\t b \r\n",
          b"a\r\n\r\n\r\nb\r\n\r\n"]


def _random_body(rng: random.Random) -> bytes:
    return bytes(rng.choice(b"ab \t\r\n\r\n") for _ in range(rng.randrange(0, 60)))


@pytest.mark.parametrize("canon,reference", [("relaxed", Relaxed), ("simple", Simple)])
def test_the_streamed_body_hash_equals_dkimpys_canonical_body_for_every_split(canon, reference):
    rng = random.Random(15)
    bodies = BODIES + [_random_body(rng) for _ in range(400)]
    for body in bodies:
        # dkimpy's parser makes every bare LF a CRLF before canonicalizing
        crlf = re.sub(rb"(?<!\r)\n", b"\r\n", body)
        want = hashlib.sha256(reference.canonicalize_body(crlf)).digest()
        for _ in range(4):
            cuts = sorted(rng.randrange(0, len(body) + 1) for _ in range(rng.randrange(0, 5)))
            chunks = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
            assert canonical_body_hash(chunks, canon) == want, (body, chunks)


def test_a_body_of_one_byte_chunks_hashes_like_one_chunk():
    body = b"a  b\t\r\n\r\n c \r\n\r\n\r\n"
    one = canonical_body_hash([body], "relaxed")
    assert canonical_body_hash([bytes([c]) for c in body], "relaxed") == one


def test_many_trailing_empty_lines_are_hashed_away_without_a_copy_per_line():
    hasher = BodyHasher("relaxed")
    hasher.feed(b"x\r\n")
    for _ in range(1000):
        hasher.feed(b"\r\n" * 100)
    assert hasher.digest() == hashlib.sha256(b"x\r\n").digest()


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.algorithm)
@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple",
                                   "simple/relaxed"])
def test_what_we_sign_verifies_with_dkimpy(key, canon):
    assert verify(sign(MESSAGE, key, canon))


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.algorithm)
def test_a_second_from_added_after_signing_fails_because_from_is_oversigned(key):
    signed = sign(MESSAGE, key)
    head, body = signed.split(b"\r\n\r\n", 1)
    assert not verify(head + b"\r\nFrom: mallory@evil.example\r\n\r\n" + body)
    # Cc was absent and over-signed: adding one breaks the signature too
    assert not verify(head + b"\r\nCc: mallory@evil.example\r\n\r\n" + body)


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.algorithm)
def test_a_changed_body_or_subject_fails(key):
    signed = sign(MESSAGE, key)
    assert not verify(signed.replace(b"Hello", b"Jello"))
    assert not verify(signed.replace(b"a fold", b"a fol"))


def test_h_lists_each_instance_once_and_over_signed_names_once_more():
    fields = [(b"From", b" a@x"), (b"Received", b" r"), (b"To", b" b"), (b"To", b" c")]
    assert h_list(fields, ["from", "to", "cc", "subject"], ["from", "cc"]) == [
        b"from", b"from", b"to", b"to", b"cc"]


def test_the_header_hash_input_takes_instances_bottom_up_and_the_signature_last():
    fields = [(b"To", b" one"), (b"To", b" two")]
    data = header_hash_input(fields, [b"to", b"to", b"to"], "relaxed",
                             (b"DKIM-Signature", b" a=1; b=abc; bh=x"))
    assert data == b"to:two\r\nto:one\r\ndkim-signature:a=1; b=; bh=x"


def test_the_signature_never_carries_l_and_keeps_t_and_x():
    head, body = MESSAGE.split(b"\r\n\r\n", 1)
    _, value = dkim_signature(KEYS[0], fields_of(head), canonical_body_hash([body], "relaxed"),
                              signed_headers=SIGNED, oversign=OVER, timestamp=100,
                              expire=200)
    tags = dict(t.strip().split(b"=", 1) for t in value.replace(b"\r\n\t", b"").split(b";"))
    assert b"l" not in tags and tags[b"t"] == b"100" and tags[b"x"] == b"200"
    assert all(len(line) <= 78 for line in (b"DKIM-Signature:" + value).split(b"\r\n"))


def test_a_key_of_the_wrong_type_for_its_algorithm_is_refused():
    with pytest.raises(ValueError):
        SigningKey("example.com", "r", "ed25519-sha256", RSA)
    with pytest.raises(ValueError):
        SigningKey("example.com", "r", "rsa-sha1", RSA)


def test_a_signature_without_from_is_refused():
    with pytest.raises(ValueError):
        dkim_signature(KEYS[0], [(b"To", b" x")], b"\0" * 32, signed_headers=["to"],
                       oversign=[], timestamp=1)
