"""The tokens in review links: signed, expiring, bound to one review, one person, one action.

    key = load_token_key(config.review.token_key_file)
    token = issue(key, record.id, "boss@example.jp", "approve", expires=now + 8 * 3600)
    claims = verify(key, token, action="approve")          # TokenInvalid when not good
    book.decide(claims.review_id, claims.person, ip, claims.action, token_id=claims.token_id)

A token is `PAYLOAD.SIGNATURE`, both base64url without padding: the payload is the JSON list
[review id, person, action, expiry]; the signature is HMAC-SHA256 over the payload's text
with the key of `review.token_key_file` (never in YAML). Single use is the book's part: the
decision marks `token_id` used in the same transaction, so a replayed link is refused there.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import TokenInvalid
from ..secrets import signing_key
from .record import ACTIONS, ID_PATTERN

KEY_BYTES = 32
MAX_TOKEN = 1024  # characters; anything longer is refused before any decoding
MAX_PERSON = 320  # an address: 64 + @ + 255
_DOMAIN = b"mailmoat-review-token\x00"  # this key signs nothing else the same way
_PART = re.compile(r"[A-Za-z0-9_-]+\Z")
_SIGNATURE_CHARS = 43  # 32 bytes in unpadded base64url


@dataclass(frozen=True)
class Claims:
    review_id: str
    person: str
    action: str
    expires: int  # unix time
    token_id: str  # names this token in the book's used marks (from its signature)


def load_token_key(path: Path) -> bytes:
    """The links' signing key (review.token_key_file): read, or made 0600 when missing."""
    return signing_key(path, "review.token_key_file", KEY_BYTES)


def issue(key: bytes, review_id: str, person: str, action: str, expires: float) -> str:
    """A URL-safe token for `person` to take `action` on the review until `expires`."""
    if not ID_PATTERN.match(str(review_id)):
        raise ValueError(f"not a review ID: {str(review_id)[:40]!r}")
    if action not in ACTIONS:
        raise ValueError(f"not a review action: {str(action)[:40]!r}")
    person = str(person).strip().lower()
    if not person or len(person) > MAX_PERSON or any(ord(c) < 0x20 for c in person):
        raise ValueError("a token's person is an address")
    if not math.isfinite(expires):
        raise ValueError("a token's expiry is a time")
    payload = json.dumps([review_id, person, action, int(expires)], ensure_ascii=False,
                         separators=(",", ":")).encode("utf-8")
    head = _b64(payload)
    return f"{head}.{_b64(_sign(key, head))}"


def verify(key: bytes, token: object, *, now: float | None = None,
           review_id: str | None = None, person: str | None = None,
           action: str | None = None) -> Claims:
    """The token's claims when it is ours, unaltered, unexpired and (for what is given)
    for this review, person and action; TokenInvalid otherwise. Whether it was used
    already is the book's to say (decide with token_id, or token_used)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or not token.isascii():
        raise TokenInvalid("malformed", "this link is not a review link")
    head, dot, tail = token.partition(".")
    if not dot or not _PART.match(head) or not _PART.match(tail) \
            or len(tail) != _SIGNATURE_CHARS:
        raise TokenInvalid("malformed", "this link is not a review link")
    signature = _unb64(tail)
    # Canonical base64 only: another spelling of the same signature would be another
    # token_id, and so a second use of one link.
    if signature is None or _b64(signature) != tail:
        raise TokenInvalid("malformed", "this link is not a review link")
    if not hmac.compare_digest(signature, _sign(key, head)):
        raise TokenInvalid("signature", "this link was not made by this gateway or was "
                           "altered")
    claims = _claims(head, signature)
    if (time.time() if now is None else now) >= claims.expires:
        raise TokenInvalid("expired", "this link has expired")
    for name, wanted, got in (("review", review_id, claims.review_id),
                              ("person", person, claims.person),
                              ("action", action, claims.action)):
        if wanted is not None and (wanted.strip().lower() if name == "person"
                                   else wanted) != got:
            raise TokenInvalid("mismatch", f"this link is for another {name}")
    return claims


def link(console_url: str, token: str) -> str:
    """The URL a notice carries: the console's confirmation page for this token."""
    return f"{console_url.rstrip('/')}/review/{token}"


def _claims(head: str, signature: bytes) -> Claims:
    raw = _unb64(head)
    try:
        data = json.loads(raw.decode("utf-8")) if raw is not None else None
    except (UnicodeDecodeError, ValueError):
        data = None
    if not (isinstance(data, list) and len(data) == 4 and isinstance(data[0], str)
            and ID_PATTERN.match(data[0]) and isinstance(data[1], str)
            and data[2] in ACTIONS and isinstance(data[3], int)):
        raise TokenInvalid("malformed", "this link is not a review link")
    token_id = hashlib.sha256(signature).hexdigest()[:32]
    return Claims(data[0], data[1], data[2], data[3], token_id)


def _sign(key: bytes, head: str) -> bytes:
    return hmac.new(key, _DOMAIN + head.encode("ascii"), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


__all__ = ["Claims", "KEY_BYTES", "issue", "link", "load_token_key", "verify"]
