"""The `arc:` part of the sign section and which mail gets an ARC set: the pieces settings.py
and logic.py plug in (arc_seal.py makes the set).

    sign:
      keys: [...]
      arc:
        seal: changed | all | none        # default changed: inbound mail a milter of ours changed
        key: SELECTOR._domainkey.DOMAIN   # an RSA key of sign.keys, by its DNS name

Wiring (settings.py): `"arc": Field(ARC_SPEC, factory=ArcChoice)` in SETTINGS_SPEC and
`arc=resolve(arc, keys)` in _build (SignSettings.arc: ArcSettings). logic.py, at the end of
the header section: `why = wants_seal(settings.arc, inbound, fields)`; when it is "", hash the
body relaxed (dkim_sign.BodyHasher("relaxed"), shared with DKIM when that is relaxed too)
and at end of message add `arc_seal.edits(arc_seal.seal(fields, digest, key=settings.arc.key,
authserv_id=<gateway.hostname>, timestamp=now))`, logging NotSealed.reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from milters.core.policy.schema import Field, Str, Struct

from .arc_seal import changed
from .dkim_sign import Field as HeaderField
from .dkim_sign import SigningKey

SEAL_MODES = ("changed", "all", "none")


@dataclass(frozen=True)
class ArcChoice:
    """The section as written, before its key is looked up in sign.keys."""

    seal: str = "changed"
    key: str = ""


@dataclass(frozen=True)
class ArcSettings:
    seal: str = "none"  # no arc: section, no key: nothing is sealed
    key: SigningKey | None = None


ARC_SPEC = Struct({
    "seal": Field(Str(SEAL_MODES), "changed"),
    "key": Field(Str(max_len=300), ""),
}, build=ArcChoice, expected="the ARC settings: seal, key")


def resolve(choice: ArcChoice, keys: Iterable[SigningKey]) -> ArcSettings:
    """The key arc.key names; ValueError (a policy error at the sign section) otherwise."""
    if choice.seal == "none":
        if choice.key:
            raise ValueError(f"arc.key is set but arc.seal is none (got {choice.key}); "
                             "remove the key or choose changed or all")
        return ArcSettings("none", None)
    if not choice.key:
        raise ValueError(f"arc.seal is {choice.seal} but arc.key is missing; name a key of "
                         "sign.keys as SELECTOR._domainkey.DOMAIN")
    selector, sep, domain = choice.key.strip().lower().rstrip(".").partition("._domainkey.")
    found = [k for k in keys if sep and k.selector.lower() == selector
             and k.domain.lower() == domain]
    if not found:
        known = ", ".join(f"{k.selector}._domainkey.{k.domain}" for k in keys) or "none"
        raise ValueError(f"arc.key names no key of sign.keys (got {choice.key}; keys: {known})")
    if found[0].algorithm != "rsa-sha256":
        raise ValueError(f"arc.key must be an RSA key: ARC verifiers accept rsa-sha256 only "
                         f"(got {choice.key}, {found[0].algorithm})")
    return ArcSettings(choice.seal, found[0])


def wants_seal(arc: ArcSettings, inbound: bool, fields: Iterable[HeaderField]) -> str:
    """"" when this message gets an ARC set, else why not (for the log)."""
    if arc.seal == "none" or arc.key is None:
        return "arc.seal is none"
    if not inbound:
        return "outbound: DKIM-signed, not sealed"
    if arc.seal == "changed" and not changed(fields):
        return "unchanged: no milter of ours changed it"
    return ""
