"""DKIM (RFC 6376, ed25519 per RFC 8463) and ARC (RFC 8617) verification through dkimpy,
with one result per signature in RFC 8601 terms.

dkimpy answers a signature with True/False or an exception; the distinctions a report
needs (no key = permerror, DNS timeout = temperror, a key below the policy's size =
policy, an expired signature = fail) come from watching the key lookup ourselves and from
the exception type.

The body is never handed to dkimpy: body_hash.py hashes it as it arrives, and dkimpy gets
the header section with that hash (_HashedBody), so a message costs its headers here.
"""
from __future__ import annotations

import base64
import functools
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from milters.core.dns import DnsTempError

from .body_hash import QUIET, BodyHashes, SignedParts, from_raw, key_for
from .settings import DkimSettings

# name -> the TXT records at that name (character-strings joined); raises DnsTempError.
TxtLookup = Callable[[str], list[bytes]]

_quiet = QUIET

# Checking the expiry (x=) is dkimpy's; a policy that accepts expired signatures needs it
# skipped for the check in progress only, hence a per-thread switch around dkimpy's own
# field validation (the x= tag is only validated there, never hashed differently).
_expiry = threading.local()
_validate_fields = dkim.validate_signature_fields


def _validate_maybe_expired(sig: dict[bytes, bytes], *args: Any, **kwargs: Any) -> Any:
    if getattr(_expiry, "ignore", False) and b"x" in sig:
        sig = {k: v for k, v in sig.items() if k != b"x"}
    return _validate_fields(sig, *args, **kwargs)


dkim.validate_signature_fields = _validate_maybe_expired
# The same few keys sign most mail: parse each published key once, not per message (dkimpy
# parses the ASN.1 and the modulus on every verification). The parsed key is only read.
dkim.evaluate_pk = functools.lru_cache(maxsize=1024)(dkim.evaluate_pk)

# dkimpy checks RSA signatures in pure Python (a quarter of the milter's CPU in
# bench/auth.py); OpenSSL, through `cryptography`, checks the same digest dkimpy computed.
_HASHES = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}
_pure_python_verify = dkim.RSASSA_PKCS1_v1_5_verify


@functools.lru_cache(maxsize=1024)
def _rsa_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def _verify_rsa_with_openssl(digest: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    algorithm = _HASHES.get(getattr(digest, "name", ""))
    try:
        key = _rsa_key(public_key["modulus"], public_key["publicExponent"])
    except (ValueError, TypeError, KeyError):  # a key OpenSSL will not load: dkimpy decides
        return bool(_pure_python_verify(digest, signature, public_key))
    if algorithm is None:
        return bool(_pure_python_verify(digest, signature, public_key))
    try:
        key.verify(signature, digest.digest(), padding.PKCS1v15(), Prehashed(algorithm))
    except (InvalidSignature, ValueError):
        return False
    return True


dkim.RSASSA_PKCS1_v1_5_verify = _verify_rsa_with_openssl


class _HashedBody:
    """dkimpy's signature check over a header section alone, the body hash (bh=, l=)
    compared with the one computed as the body came (body_hash.py). dkimpy hashes the
    signed headers and checks b= as it always does: bh= is part of the signed header, so
    the header signature binds the body hash checked here."""

    body: BodyHashes

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Any) -> Any:
        # A key for TLS reports only, or a c= dkimpy refuses: dkimpy says so, as before.
        key = key_for(sig, b"simple/simple") if b"bh" in sig and not self.seqtlsrpt else None
        if key is not None:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            got = self.body.digest(key)
            if got is None:  # a signature wanted_keys() did not foresee: never a pass
                raise dkim.ValidationError("body hash not computed for this signature")
            if got != expected:
                raise dkim.ValidationError("body hash mismatch (got %s, expected %s)" % (
                    base64.b64encode(got).decode(), sig[b"bh"].decode("ascii", "replace")))
            sig = {name: value for name, value in sig.items() if name != b"bh"}
        return super().verify_sig_process(  # type: ignore[misc]
            sig, include_headers, sig_header, dnsfunc)


class _DkimVerifier(_HashedBody, dkim.DKIM):
    pass


class _ArcVerifier(_HashedBody, dkim.ARC):
    pass


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass, fail, policy, neutral, temperror, permerror
    domain: str  # d=
    selector: str  # s=
    algorithm: str  # a=
    header_b: str  # the first 8 characters of b= (RFC 6008), to tell signatures apart
    identity: str = ""  # i=
    reason: str = ""


@dataclass(frozen=True)
class ArcResult:
    result: str  # pass, fail, none (RFC 8617 cv)
    sealers: tuple[str, ...] = ()  # d= of each ARC-Seal, newest first
    reason: str = ""


def _tags(value: bytes) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in value.split(b";"):
        name, sep, text = part.partition(b"=")
        if sep:
            tags[name.strip().decode("ascii", "replace")] = re.sub(
                r"\s+", "", text.decode("ascii", "replace"))
    return tags


def _signature_headers(head: bytes) -> list[bytes]:
    headers, _ = dkim.rfc822_parse(head)
    return [value for name, value in headers if name.lower() == b"dkim-signature"]


class _KeyWatch:
    """dkimpy's dnsfunc: fetches the key and remembers what happened to it."""

    def __init__(self, lookup: TxtLookup, signature_hash: str = "") -> None:
        self.lookup = lookup
        self.signature_hash = signature_hash  # "sha256" from a=rsa-sha256
        self.missing = False
        self.revoked = False
        self.bad_key = ""

    def __call__(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = self.lookup(text.rstrip("."))  # DnsTempError goes through dkimpy to us
        keys = [r for r in records if not r.lstrip().startswith(b"v=") or
                r.lstrip().startswith(b"v=DKIM1")]
        if len(keys) != 1:
            self.missing = True
            return None
        if _tags(keys[0]).get("p") == "":  # RFC 6376 3.6.1: an empty p= revokes the key
            self.revoked = True
            return keys[0]
        try:
            dkim.evaluate_pk(name, keys[0])  # cached: dkimpy asks the same right after
        except dkim.DKIMException as exc:
            self.bad_key = plain(str(exc))
        # RFC 6376 3.6.1: a key with h= may only verify signatures made with those hashes
        # (dkimpy does not look at h=).
        allowed = _tags(keys[0]).get("h")
        if allowed and self.signature_hash and \
                self.signature_hash not in allowed.lower().split(":"):
            self.bad_key = f"key allows h={allowed}, signature uses {self.signature_hash}"
        return keys[0]


def _unsigned_tail(body: BodyHashes, tags: dict[str, str]) -> int:
    """How many canonical body bytes an l= tag leaves outside the signature (asked of a
    signature that verified: its canonicalization was computed)."""
    if "l" not in tags or not tags["l"].isdigit():
        return 0
    policy = dkim.CanonicalizationPolicy.from_c_value(tags.get("c", "simple/simple").encode())
    length = body.canonical_length(policy.body_algorithm.name)
    if length is None:  # cannot happen after a pass; never call a partial signature whole
        raise dkim.ValidationError("canonical body length not computed")
    return max(0, length - int(tags["l"]))


def plain(text: str | bytes) -> str:
    """Text for a human: dkimpy formats bytes into its messages as Python reprs (b'...');
    take the quotes and the b off."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return _BYTES_REPR.sub(r"\2", text)


_BYTES_REPR = re.compile(r"""\bb(['"])(.*?)\1""")


def _expired(tags: dict[str, str]) -> str:
    x = tags.get("x", "")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(int(x))) if x.isdigit() \
        and int(x) < 2 ** 40 else x
    return f"signature expired at {when}"


def _small_key(exc: Exception, settings: DkimSettings) -> str:
    bits = re.search(r"\d+", str(exc))
    size = f"RSA key of {bits.group()} bits" if bits else "RSA key"
    if bits and int(bits.group()) < 1024:
        return f"{size} refused: RFC 8301 requires at least 1024 bits"
    return f"{size} refused: below the policy minimum of {settings.min_rsa_bits} bits"


def verify_one(verifier: _DkimVerifier, index: int, signature: bytes,
               lookup: TxtLookup, settings: DkimSettings) -> DkimResult:
    tags = _tags(signature)
    made = dict(domain=tags.get("d", "").lower(), selector=tags.get("s", ""),
                algorithm=tags.get("a", ""), header_b=tags.get("b", "")[:8],
                identity=tags.get("i", ""))
    key_name = f"{made['selector']}._domainkey.{made['domain']}"
    watch = _KeyWatch(lookup, made["algorithm"].lower().rpartition("-")[2])
    _expiry.ignore = settings.allow_expired
    try:
        good = verifier.verify(idx=index, dnsfunc=watch)
    except DnsTempError as exc:
        return DkimResult("temperror", reason=f"key lookup failed: {exc}", **made)
    except dkim.KeyFormatError as exc:  # also raised for a key below minkey
        if watch.revoked:
            return DkimResult("permerror", reason="key revoked (empty p=)", **made)
        if watch.missing:
            return DkimResult("permerror", reason=f"no key published at {key_name}", **made)
        if "too small" in str(exc):
            return DkimResult("policy", reason=_small_key(exc, settings), **made)
        return DkimResult("permerror", reason=f"key unusable: {plain(str(exc))}", **made)
    except dkim.ValidationError as exc:
        text = str(exc)
        if text.startswith("body hash mismatch"):
            return DkimResult("fail", reason="body hash did not verify", **made)
        if text.startswith("x= value is past"):
            return DkimResult("fail", reason=_expired(tags), **made)
        return DkimResult("permerror", reason=f"signature unusable: {plain(text)}", **made)
    except dkim.DKIMException as exc:
        return DkimResult("permerror", reason=f"signature unusable: {plain(str(exc))}", **made)
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # dkimpy on mangled input
        return DkimResult("permerror", reason=f"signature unparseable: {plain(str(exc))}",
                          **made)
    finally:
        _expiry.ignore = False
    if watch.revoked:
        return DkimResult("permerror", reason="key revoked (empty p=)", **made)
    if watch.missing:
        return DkimResult("permerror", reason=f"no key published at {key_name}", **made)
    if watch.bad_key:
        return DkimResult("permerror", reason=f"key unusable: {watch.bad_key}", **made)
    if not good:
        return DkimResult("fail", reason="signature did not verify", **made)
    if made["algorithm"].lower() == "rsa-sha1" and not settings.allow_sha1:
        return DkimResult("policy", reason="rsa-sha1 refused (RFC 8301)", **made)
    unsigned = _unsigned_tail(verifier.body, tags)
    if unsigned and not settings.allow_partial_body:
        return DkimResult("policy", reason=f"l= leaves {unsigned} body bytes unsigned", **made)
    return DkimResult("pass", **made)


def signed_parts(message: bytes | SignedParts, max_signatures: int = 10) -> SignedParts:
    """A whole message (tests, `policy test`) is split and its body hashed here; the
    milter hands over the parts it built as the body came."""
    return message if isinstance(message, SignedParts) else from_raw(message, max_signatures)


def verify_dkim(message: bytes | SignedParts, lookup: TxtLookup,
                settings: DkimSettings = DkimSettings(),
                max_signatures: int = 10) -> list[DkimResult]:
    """Every DKIM-Signature in the message, top to bottom ([] when there is none). Past
    `max_signatures` the rest are not checked: each costs a key lookup and an RSA check."""
    parts = signed_parts(message, max_signatures)
    try:
        signatures = _signature_headers(parts.head)
    except dkim.DKIMException:  # a header section dkimpy cannot split: nothing to verify
        return []
    if not signatures:
        return []
    verifier = _DkimVerifier(parts.head, logger=_quiet, minkey=settings.min_rsa_bits)
    verifier.body = parts.body
    return [verify_one(verifier, index, signature, lookup, settings)
            for index, signature in enumerate(signatures[:max_signatures])]


def verify_arc(message: bytes | SignedParts, lookup: TxtLookup,
               settings: DkimSettings = DkimSettings()) -> ArcResult:
    """The ARC chain's validation (RFC 8617 5.2)."""
    parts = signed_parts(message)
    watch = _KeyWatch(lookup)
    try:
        verifier = _ArcVerifier(parts.head, logger=_quiet, minkey=settings.min_rsa_bits)
        verifier.body = parts.body
        try:
            cv, instances, reason = verifier.verify(dnsfunc=watch)
        except dkim.DKIMException as exc:  # what dkim.arc_verify answers for it
            cv, instances, reason = dkim.CV_Fail, [], str(exc)
    except DnsTempError as exc:
        return ArcResult("temperror", reason=str(exc))
    except (dkim.DKIMException, ValueError, TypeError, KeyError, IndexError) as exc:
        return ArcResult("fail", reason=f"chain unusable: {plain(str(exc))}")
    result = (cv or b"fail").decode("ascii", "replace").lower()
    sealers = tuple(item["as-domain"].decode("ascii", "replace").lower()
                    for item in instances if item.get("as-domain"))
    return ArcResult(result if result in ("pass", "fail", "none") else "fail", sealers,
                     plain(reason or ""))
