"""DKIM and ARC body hashes (RFC 6376 3.4.3-3.4.5, 3.5 bh= and l=, 3.7; RFC 8617 4.1.2)
computed chunk by chunk as the body arrives, so the auth milter keeps the header section
only: its memory per message does not grow with the body, however many big messages come
at once (issue 13 section 4).

The canonical body must equal, byte for byte, what dkimpy makes of the whole body (the
signature check that follows is dkimpy's own, handed this digest instead of the body):
line ends as dkimpy's parser makes them (every LF preceded by a CR), then simple (trailing
empty lines cut to one CRLF; CRLF for an empty body) or relaxed (whitespace runs to one
space, none before a line end, trailing empty lines cut, an empty body stays empty).
Only what a later byte can change is held back, in a few bytes of state: a trailing CR,
a trailing whitespace run (as one space) and a count of trailing empty lines. Every regex
here is linear (no backtracking), so a hostile body cannot make hashing quadratic.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value


# dkimpy logs what it refuses at ERROR; our results say it, once, in Authentication-Results.
QUIET = logging.getLogger("mailmoat.dkimpy")
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


class HashKey(NamedTuple):
    """One body hash a signature asks for."""

    canon: bytes  # body canonicalization: b"simple" or b"relaxed"
    hash_name: str  # hashlib name: "sha256", "sha1"
    length: int | None  # l=: hash only this many canonical bytes


_BARE_LF = re.compile(rb"(?<!\r)\n")
_WSP = re.compile(rb"[\t ]+")
_CRLFS_AT_ONCE = 32768  # held-back empty lines are hashed in pieces of this many


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


class _CanonicalBody:
    """One canonicalization of the body, fed raw chunks, handing final canonical bytes to
    its hashers."""

    def __init__(self, relaxed: bool) -> None:
        self.relaxed = relaxed
        self.hashers: list[_Hasher] = []
        self.length = 0  # canonical bytes so far (all of them once finished)
        self._carry = b""  # raw tail a later byte may change: at most b" \r"
        self._empty_lines = 0  # CRLFs held back: they vanish if nothing else follows
        self._content = False  # anything but empty lines seen (relaxed: empty body is b"")

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk
        if b"\n" in data:
            data = _BARE_LF.sub(b"\r\n", data)  # dkimpy reads a bare LF as a line end
        cut = data.rfind(b"\n") + 1
        lines, rest = data[:cut], data[cut:]  # whole lines; the line still open
        keep = len(rest) - 1 if rest.endswith(b"\r") else len(rest)  # CR: maybe a CRLF
        if self.relaxed:
            keep = len(rest[:keep].rstrip(b" \t"))  # whitespace: maybe before a line end
            # A run compressed to one space, then dropped before CRLF: the same as dkimpy's
            # strip-then-compress, without its regex's backtracking on long runs.
            lines = _WSP.sub(b" ", lines).replace(b" \r\n", b"\r\n")
            self._carry = _WSP.sub(b" ", rest[keep:])
            self._put(lines + _WSP.sub(b" ", rest[:keep]))
        else:
            self._carry = rest[keep:]
            self._put(lines + rest[:keep])

    def finish(self) -> None:
        """The body ended: what was held back is final; one CRLF ends a simple body and a
        relaxed one with content."""
        carry, self._carry = self._carry, b""
        self._put(carry)
        if self._content or not self.relaxed:
            self._emit(b"\r\n")

    def _put(self, piece: bytes) -> None:
        """Canonical bytes whose trailing CRLFs may still be empty lines at the end."""
        if not piece:
            return
        # Every LF here follows a CR; the last "\r\r" (a bare CR) ends any CRLF run.
        tail_start = len(piece.rstrip(b"\r\n"))
        tail = piece[tail_start:]
        if tail.endswith(b"\r\n"):
            bare_cr = tail.rfind(b"\r\r")
            run = (len(tail) - (bare_cr + 1 if bare_cr >= 0 else 0)) // 2
        else:
            run = 0
        content = len(piece) - 2 * run
        if content == 0:
            self._empty_lines += run
            return
        while self._empty_lines:  # not the end after all
            count = min(self._empty_lines, _CRLFS_AT_ONCE)
            self._emit(b"\r\n" * count)
            self._empty_lines -= count
        self._emit(piece[:content])
        self._empty_lines = run
        self._content = True

    def _emit(self, data: bytes) -> None:
        self.length += len(data)
        for hasher in self.hashers:
            hasher.update(data)


class BodyHashes:
    """The body hashes a message's signatures ask for, fed the body as it comes."""

    def __init__(self, keys: Iterable[HashKey]) -> None:
        self._streams: dict[bytes, _CanonicalBody] = {}
        self._hashers: dict[HashKey, _Hasher] = {}
        for key in keys:
            stream = self._streams.get(key.canon)
            if stream is None:
                stream = self._streams[key.canon] = _CanonicalBody(key.canon == b"relaxed")
            self._hashers[key] = _Hasher(key)
            stream.hashers.append(self._hashers[key])
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
