"""DKIM and ARC body hashes (RFC 6376 3.5 bh= and l=, 3.7; RFC 8617 4.1.2) computed chunk
by chunk as the body arrives, so the auth milter keeps the header section only: its memory
per message does not grow with the body, however many big messages come at once (issue 13
section 4). The canonical body is milters/core/dkim_body.py's, byte for byte what dkimpy
makes of the whole body (the signature check that follows is dkimpy's own, handed this
digest instead of the body); here: which hashes a message needs, several per
canonicalization, each cut at its l=.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from milters.core.dkim_body import CanonicalBody


# dkimpy logs what it refuses at ERROR; our results say it, once, in Authentication-Results.
QUIET = logging.getLogger("mailmoat.dkimpy")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


class HashKey(NamedTuple):
    """One body hash a signature asks for."""

    canon: bytes  # body canonicalization: b"simple" or b"relaxed"
    hash_name: str  # hashlib name: "sha256", "sha1"
    length: int | None  # l=: hash only this many canonical bytes


class _Hasher:
    def __init__(self, key: HashKey) -> None:
        self.state = _hash_factory(key.hash_name)()
        self.left = key.length  # None: no l=, hash everything

    def update(self, data: bytes) -> None:
        if self.left is None:
            self.state.update(data)
        elif self.left > 0:
            self.state.update(data[:self.left])
            self.left -= min(len(data), self.left)


class BodyHashes:
    """The body hashes a message's signatures ask for, fed the body as it comes."""

    def __init__(self, keys: Iterable[HashKey]) -> None:
        self._hashers: dict[HashKey, _Hasher] = {key: _Hasher(key) for key in keys}
        by_canon: dict[bytes, list[_Hasher]] = {}
        for key, hasher in self._hashers.items():
            by_canon.setdefault(key.canon, []).append(hasher)
        self._streams = {canon: CanonicalBody(canon.decode("ascii"), _fan_out(hashers))
                         for canon, hashers in by_canon.items()}
        self._finished = False

    def feed(self, chunk: bytes) -> None:
        if self._finished:
            raise ValueError("body fed after its end")
        for stream in self._streams.values():
            stream.feed(chunk)

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            for stream in self._streams.values():
                stream.finish()

    def digest(self, key: HashKey) -> bytes | None:
        """The hash of the canonical body (its first l= bytes), None when not computed."""
        self.finish()
        hasher = self._hashers.get(key)
        return None if hasher is None else hasher.state.copy().digest()

    def canonical_length(self, canon: bytes) -> int | None:
        self.finish()
        stream = self._streams.get(canon)
        return None if stream is None else stream.length


def _fan_out(hashers: list[_Hasher]) -> Callable[[bytes], None]:
    """One canonical stream into all its hashers; a lone hasher is called directly."""
    if len(hashers) == 1:
        return hashers[0].update

    def update_all(data: bytes) -> None:
        for hasher in hashers:
            hasher.update(data)
    return update_all


def _hash_factory(name: str) -> Callable[[], Any]:
    for factory in dkim.HASH_ALGORITHMS.values():
        if factory().name == name:
            return factory  # type: ignore[no-any-return]
    raise ValueError(f"no hash {name}")


def key_for(sig: dict[bytes, bytes], default_c: bytes) -> HashKey | None:
    """The body hash a parsed signature asks for, as dkimpy reads it: None for a c= or a=
    dkimpy refuses before hashing the body; an l= that is not a number raises ValueError,
    as in dkimpy."""
    try:
        policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", default_c))
    except InvalidCanonicalizationPolicyError:
        return None
    factory = dkim.HASH_ALGORITHMS.get(sig.get(b"a", b""))
    if factory is None:
        return None
    length = int(sig[b"l"]) if b"l" in sig else None
    return HashKey(policy.body_algorithm.name, factory().name, length)


def wanted_keys(head: bytes, max_signatures: int) -> set[HashKey]:
    """The body hashes the header section's signatures need: the DKIM signatures that will
    be checked (the first `max_signatures`) and the newest ARC-Message-Signature (only the
    newest one decides the chain, RFC 8617 5.2; an older one asking for another body hash
    is reported invalid, which changes no verdict). Few, however many signatures a sender
    writes: each costs one pass of hashing."""
    try:
        headers, _ = dkim.rfc822_parse(head)
        arc = dkim.ARC(head, logger=QUIET)
        newest, sets = arc.sorted_arc_headers()
    except dkim.DKIMException:  # dkimpy refuses this header section before any body hash
        return set()
    found = [(value, b"simple/simple") for name, value in headers
             if name.lower() == b"dkim-signature"][:max_signatures]
    found += [(value, b"relaxed/relaxed") for instance, (name, value) in sets
              if instance == newest and name.lower() == b"arc-message-signature"]
    keys = set()
    for value, default_c in found:
        try:
            key = key_for(parse_tag_value(value), default_c)
        except (InvalidTagValueList, ValueError):  # dkimpy refuses it the same way
            continue
        if key is not None:
            keys.add(key)
    return keys


@dataclass(frozen=True)
class SignedParts:
    """What DKIM and ARC verification need of a message: its header section (with the
    empty line that ends it) and the body hashes its signatures ask for."""

    head: bytes
    body: BodyHashes


# Where dkimpy's parser ends the header section: the first empty line, LF or CRLF.
_HEADER_END = re.compile(rb"(?:\A|\r?\n)\r?\n")


def from_raw(raw: bytes, max_signatures: int, piece: int = 1 << 20) -> SignedParts:
    """The same from a whole message in memory (tests, `policy test`): its body is fed in
    pieces, as the milter gets it."""
    end = _HEADER_END.search(raw)
    split = end.end() if end else len(raw)
    head = bytes(raw[:split])
    body = BodyHashes(wanted_keys(head, max_signatures))
    view = memoryview(raw)
    for start in range(split, len(raw), piece):
        body.feed(bytes(view[start:start + piece]))
    body.finish()
    return SignedParts(head, body)
