"""ARC sealing (RFC 8617): one ARC set added to inbound mail as it leaves, after every other
milter's edits, so the next hop can trust the verdicts we made before we changed the message.

The set is made of
- ARC-Authentication-Results (AAR): `i=N; ` + the auth milter's own Authentication-Results
  value (the header with our authserv-id, written before any edit: the verdicts on the
  message as it came). Read and checked with milters.core.auth_results, so a header of ours
  that does not read back as the auth milter writes it gives no seal at all.
- ARC-Message-Signature (AMS): a DKIM-like signature (relaxed/relaxed, no v=) over the
  message as it leaves; never over ARC-Seal or Authentication-Results (RFC 8617 4.1.2).
- ARC-Seal (AS): over the ARC sets in instance order (AAR, AMS, AS of each), ours last with
  an empty b=; with cv=fail over our own set only (RFC 8617 5.1.2).

The chain status (cv=) is the auth milter's `arc=` result, not a second verification: the
chain is judged as it came in (RFC 8617 5.2), and after our edits the newest incoming AMS
no longer verifies, so re-verifying here would call every chain we touched a failure. What
this module does check is that the headers still agree with that result: arc=pass with a
chain that is now incomplete, duplicated or gone, or arc=none with ARC headers present,
is sealed cv=fail. A chain whose newest seal already says cv=fail is not continued (RFC 8617
5.1 step 1), and nothing is sealed past instance 50 (RFC 8617 4.2.1).

Crypto, canonicalization and folding are dkim_sign.py's (the one signer in the project).

API (called from logic.py):

    seal(fields, body_hash, *, key, authserv_id, timestamp,
         signed_headers=SIGNED, oversign=OVERSIGN) -> Sealed | NotSealed
        fields: the header fields as the message leaves, top to bottom, (name, value)
            bytes as dkim_sign.py takes them (value = the bytes after the colon).
        body_hash: SHA-256 of the relaxed canonical body: dkim_sign.BodyHasher("relaxed"),
            the same digest a relaxed/relaxed DKIM signature uses.
        Sealed.fields: [ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results],
            to be inserted at the top of the header in that order (folded with CRLF TAB,
            like dkim_signature; a libmilter caller turns CRLF into LF).
        NotSealed.reason: why not, for the log.
    plan(fields, authserv_id) -> Plan | NotSealed        what seal() would do, no key needed
    changed(fields) -> str               which of our milters changed the message ("" none)
    arc_set(fields, body_hash, *, key, auth_results_value, chain_status, instance,
            timestamp, previous=(), signed_headers=SIGNED, oversign=OVERSIGN) -> list[Field]

Policy (the sign section; settings.py reads it):

    arc:
      seal: changed | all | none   # which inbound mail gets a set; default changed
      key: SELECTOR._domainkey.DOMAIN   # an RSA key of sign.keys, by its DNS name (one
                                        # domain may hold several selectors); ed25519 is refused:
                                        # ARC verifiers (dkimpy's, so ours) know rsa-sha256 only
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Iterable

from dkim.util import InvalidTagValueList, parse_tag_value

from milters.core import auth_results

from .dkim_sign import (Field, SigningKey, append_folded, fold_tags, h_list, header_hash_input,
                        sign_bytes)

MAX_INSTANCE = 50  # RFC 8617 4.2.1: i= runs 1..50

AAR = b"ARC-Authentication-Results"
AMS = b"ARC-Message-Signature"
AS = b"ARC-Seal"
_ARC_NAMES = (AAR.lower(), AMS.lower(), AS.lower())

# The AMS covers what a reader sees and what DKIM covers; over-signed ones cannot be added
# after the seal without breaking it. Never ARC-Seal (RFC 8617 4.1.2), never
# Authentication-Results (each hop deletes and adds its own).
SIGNED = ("from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
          "references", "mime-version", "content-type", "content-transfer-encoding",
          "dkim-signature")
OVERSIGN = ("from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version",
            "content-type", "content-transfer-encoding")
_NEVER_SIGNED = {"arc-seal", "arc-message-signature", "arc-authentication-results",
                 "authentication-results"}

# Headers our milters add when they change a message, deleted by them when they come from
# outside (so present = ours). By name, not import: a milter never imports another. The
# neutralize milter's mark; the attachments milter works on outbound mail.
CHANGE_MARKERS = ("x-mailmoat-neutralized",)

_AAR_INSTANCE = re.compile(rb"\A[\t \r\n]*i[\t \r\n]*=[\t \r\n]*([0-9]{1,9})[\t \r\n]*;")
_TAG_INSTANCE = re.compile(rb"\A[0-9]{1,9}\Z")


@dataclass(frozen=True)
class Plan:
    instance: int  # i= of our set
    chain_status: str  # cv=: none, pass, fail
    auth_results_value: bytes  # our Authentication-Results value, CRLF-folded, no leading WSP
    previous: tuple[Field, ...]  # the incoming sets the seal covers (none for cv=fail)
    note: str = ""  # why cv is not what the auth milter said, if it is not


@dataclass(frozen=True)
class NotSealed:
    reason: str


@dataclass(frozen=True)
class Sealed:
    fields: list[Field]  # AS, AMS, AAR: insert at the top in this order
    plan: Plan


@dataclass
class _Chain:
    """The ARC headers a message carries, by instance."""

    sets: dict[int, dict[bytes, list[bytes]]]  # instance -> lower name -> values
    malformed: str = ""  # why the headers cannot be a valid chain ("" if they may be)

    @property
    def highest(self) -> int:
        return max(self.sets, default=0)


def _instance(name: bytes, value: bytes) -> int | None:
    if name == AAR.lower():
        match = _AAR_INSTANCE.match(value)
        return int(match.group(1)) if match else None
    try:
        tags = parse_tag_value(value)
    except (InvalidTagValueList, ValueError):
        return None
    text = tags.get(b"i", b"").strip()
    return int(text) if _TAG_INSTANCE.match(text) else None


def _chain(fields: Iterable[Field]) -> _Chain:
    chain = _Chain({})
    for raw_name, value in fields:
        name = raw_name.strip(b" \t").lower()
        if name not in _ARC_NAMES:
            continue
        instance = _instance(name, value)
        if instance is None:
            chain.malformed = f"{raw_name.decode('ascii', 'replace')} without a readable i="
            continue
        chain.sets.setdefault(instance, {}).setdefault(name, []).append(value)
    if chain.malformed:
        return chain
    # distinct positive instances: 1..highest exactly when there are `highest` of them (a
    # forged i=999999999 must cost nothing, so no range is ever built)
    if chain.sets and (min(chain.sets) < 1 or len(chain.sets) != chain.highest):
        chain.malformed = f"instances {sorted(chain.sets)[:8]} are not 1..{chain.highest}"
        return chain
    for instance, names in chain.sets.items():
        counts = [len(names.get(name, [])) for name in _ARC_NAMES]
        if counts != [1, 1, 1]:
            chain.malformed = f"ARC set i={instance} is not one of each header"
            return chain
    return chain


def _newest_cv(chain: _Chain) -> bytes:
    seals = chain.sets.get(chain.highest, {}).get(AS.lower(), [])
    if len(seals) != 1:
        return b""
    try:
        return parse_tag_value(seals[0]).get(b"cv", b"").strip().lower()
    except (InvalidTagValueList, ValueError):
        return b""


def _crlf(value: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", value)


def _ours(fields: list[Field], authserv_id: str) -> list[bytes] | NotSealed:
    found = []
    for name, value in fields:
        if name.strip(b" \t").lower() != auth_results.HEADER.lower().encode():
            continue
        text = value.decode("ascii", "replace")  # non-ASCII fails the parse below
        if auth_results.is_ours(text, authserv_id):
            found.append(value)
    if not found:
        return NotSealed(f"no Authentication-Results of {authserv_id} (auth did not run)")
    if len(found) > 1:  # the auth milter writes one and deletes look-alikes
        return NotSealed(f"{len(found)} Authentication-Results of {authserv_id}")
    return found


def plan(fields: list[Field], authserv_id: str) -> Plan | NotSealed:
    """The set seal() would add: its instance, its cv= and the AAR it carries."""
    ours = _ours(fields, authserv_id)
    if isinstance(ours, NotSealed):
        return ours
    value = ours[0]
    if not value.isascii():  # RFC 8601 is ASCII; the reader below would say so too
        return NotSealed("our Authentication-Results is unreadable: not ASCII")
    # read() is what every later milter trusts: the same strict reading, failing closed
    verdicts = auth_results.read([(auth_results.HEADER, value.decode("ascii"))], authserv_id)
    if verdicts is None or verdicts.unreadable:
        why = verdicts.unreadable if verdicts else "not ours once parsed"
        return NotSealed(f"our Authentication-Results is unreadable: {why}")
    reported = verdicts.methods.get("arc")

    chain = _chain(fields)
    if chain.sets and not chain.malformed and _newest_cv(chain) == b"fail":
        return NotSealed(f"the chain ended at i={chain.highest} (cv=fail): not continued")
    instance = chain.highest + 1
    if instance > MAX_INSTANCE:
        return NotSealed(f"the chain has {chain.highest} sets; i= stops at {MAX_INSTANCE}")

    note = ""
    if reported == "pass" and chain.sets and not chain.malformed:
        status = "pass"
    elif reported in (None, "none") and not chain.sets:
        status = "none"
    else:
        status = "fail"
        if reported == "pass":
            note = f"auth said arc=pass, but {chain.malformed or 'no ARC set is left'}"
        elif reported in (None, "none"):
            note = f"auth said arc={reported or 'nothing'}, but ARC headers are present"
    previous: tuple[Field, ...] = ()
    if status == "pass":  # newest first: header_hash_input takes instances bottom-up
        previous = tuple((name, chain.sets[i][name.lower()][0])
                         for i in range(chain.highest, 0, -1) for name in (AS, AMS, AAR))
    return Plan(instance, status, _crlf(value.lstrip(b" \t\r\n")), previous, note)


def arc_set(fields: list[Field], body_hash: bytes, *, key: SigningKey,
            auth_results_value: bytes, chain_status: str, instance: int, timestamp: int,
            previous: Iterable[Field] = (), signed_headers: Iterable[str] = SIGNED,
            oversign: Iterable[str] = OVERSIGN) -> list[Field]:
    """The three headers of set `instance`, AS first. `previous`: the incoming sets the
    seal covers, newest first (AS, AMS, AAR of each), empty for cv=fail."""
    if key.algorithm != "rsa-sha256":
        raise ValueError(f"ARC key {key.selector}._domainkey.{key.domain}: {key.algorithm} "
                         f"cannot seal; ARC verifiers (dkimpy, ours) accept rsa-sha256 only")
    if chain_status not in ("none", "pass", "fail"):
        raise ValueError(f"cv={chain_status!r}: not none, pass or fail")
    if not 1 <= instance <= MAX_INSTANCE:
        raise ValueError(f"i={instance}: outside 1..{MAX_INSTANCE}")
    if (chain_status == "none") != (instance == 1) and chain_status != "fail":
        raise ValueError(f"cv={chain_status} cannot be set i={instance}")
    previous = list(previous)
    if chain_status == "fail" and previous:
        raise ValueError("a cv=fail seal covers its own set only (RFC 8617 5.1.2)")
    i = str(instance).encode()
    aar = (AAR, b" i=" + i + b"; " + auth_results_value)

    wanted = [n for n in signed_headers if n.lower() not in _NEVER_SIGNED]
    names = h_list(fields, wanted, [n for n in oversign if n.lower() not in _NEVER_SIGNED])
    if b"from" not in names:
        raise ValueError("h= must sign From")
    domain, selector = key.domain.encode("ascii"), key.selector.encode("ascii")
    algorithm, t = key.algorithm.encode("ascii"), str(timestamp).encode()
    ams_tags = [(b"i", i), (b"a", algorithm), (b"c", b"relaxed/relaxed"), (b"d", domain),
                (b"s", selector), (b"t", t), (b"h", b":".join(names)),
                (b"bh", base64.b64encode(body_hash)), (b"b", b"")]
    ams = _signed(key, AMS, ams_tags, fields, names)

    seal_tags = [(b"i", i), (b"a", algorithm), (b"t", t), (b"cv", chain_status.encode()),
                 (b"d", domain), (b"s", selector), (b"b", b"")]
    covered = [ams, aar] + previous  # newest first, each set AS, AMS, AAR
    order = [AAR, AMS, AS] * (len(previous) // 3) + [AAR, AMS]
    seal_field = _signed(key, AS, seal_tags, covered, [n.lower() for n in order])
    return [seal_field, ams, aar]


def _signed(key: SigningKey, name: bytes, tags: list[tuple[bytes, bytes]],
            fields: list[Field], names: list[bytes]) -> Field:
    """The field with b= filled: relaxed header canonicalization, as RFC 8617 fixes it."""
    unsigned = fold_tags(name, tags)
    data = header_hash_input(fields, names, "relaxed", (name, unsigned))
    signature = base64.b64encode(sign_bytes(key, data))
    last = unsigned.rsplit(b"\n", 1)
    column = len(last[1]) if len(last) == 2 else len(name) + 1 + len(unsigned)
    return name, append_folded(unsigned, column, signature)[0]


def seal(fields: list[Field], body_hash: bytes, *, key: SigningKey, authserv_id: str,
         timestamp: int, signed_headers: Iterable[str] = SIGNED,
         oversign: Iterable[str] = OVERSIGN) -> Sealed | NotSealed:
    """One ARC set for the message as it leaves, or why none is added."""
    chosen = plan(fields, authserv_id)
    if isinstance(chosen, NotSealed):
        return chosen
    made = arc_set(fields, body_hash, key=key, auth_results_value=chosen.auth_results_value,
                   chain_status=chosen.chain_status, instance=chosen.instance,
                   timestamp=timestamp, previous=chosen.previous,
                   signed_headers=signed_headers, oversign=oversign)
    return Sealed(made, chosen)


def changed(fields: Iterable[Field]) -> str:
    """The marker of the milter that changed the message, "" if none did (`seal: changed`)."""
    for name, _ in fields:
        if name.strip(b" \t").lower().decode("ascii", "replace") in CHANGE_MARKERS:
            return name.strip(b" \t").decode("ascii", "replace")
    return ""
