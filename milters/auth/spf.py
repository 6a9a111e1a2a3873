"""SPF (RFC 7208) through pyspf, with our resolver and the policy's lookup limits.

pyspf asks a module-level function for DNS; we point it at the lookup function of the
check in progress (a thread-local: pymilter runs one thread per SMTP session), so the same
code serves production (our cached resolver), the RFC 7208 test suite (zone data from its
YAML) and the tests' DNS server.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import spf

from milters.core.dns import DnsTempError, Resolver

from .settings import SpfLimits

# (name, qtype) -> pyspf's answer format: [((name, qtype), value), ...]; raises
# spf.TempError for a temporary failure.
SpfLookup = Callable[[str, str], list[tuple[tuple[str, str], Any]]]

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


@dataclass(frozen=True)
class SpfResult:
    result: str  # one of RESULTS
    identity: str  # "mailfrom" or "helo"
    domain: str  # the domain checked
    explanation: str = ""


_current = threading.local()


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 20
              ) -> list[tuple[tuple[str, str], Any]]:
    lookup: SpfLookup | None = getattr(_current, "lookup", None)
    if lookup is None:
        raise spf.TempError("no DNS lookup configured for this SPF check")
    return lookup(name, qtype)


spf.DNSLookup = _dispatch  # every pyspf query goes through the check's own lookup


def resolver_lookup(resolver: Resolver) -> SpfLookup:
    """pyspf's lookups answered by our cached resolver."""
    def lookup(name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        rdtype = "TXT" if qtype == "SPF" else qtype  # type 99 is obsolete (RFC 7208 14.1)
        try:
            records = resolver.lookup(name, rdtype)
        except DnsTempError as exc:
            raise spf.TempError(str(exc)) from None
        if qtype in ("A", "AAAA"):
            return [((name, qtype), r.address) for r in records]
        if qtype == "MX":
            return [((name, qtype), (r.preference, r.exchange)) for r in records]
        if qtype == "PTR":
            return [((name, qtype), r.target.to_text(True)) for r in records]
        if qtype in ("TXT", "SPF"):
            return [((name, qtype), list(r.strings)) for r in records]
        return []
    return lookup


def check_spf(client_ip: str, mail_from: str, helo: str, lookup: SpfLookup,
              limits: SpfLimits = SpfLimits(), receiver: str = "unknown") -> SpfResult:
    """Check MAIL FROM, or HELO when MAIL FROM is the null sender (RFC 7208 2.4)."""
    identity = "mailfrom" if mail_from else "helo"
    # pyspf splits an address at its first "@": report the domain it really checks.
    domain = (mail_from.partition("@")[2] if mail_from else helo).rstrip(".").lower()
    if not client_ip:
        return SpfResult("permerror", identity, domain, "no client address to check")
    # Module-wide in pyspf; one process serves one policy, so every thread sets the same.
    spf.MAX_LOOKUP = limits.lookups
    spf.MAX_VOID_LOOKUPS = limits.void_lookups
    _current.lookup = lookup
    try:
        query = spf.query(client_ip, mail_from, helo, receiver=receiver, strict=True,
                          timeout=limits.timeout, querytime=limits.timeout)
        result, _code, explanation = query.check()
    except (spf.PermError, ValueError, UnicodeError) as exc:  # an unparseable client address
        result, explanation = "permerror", str(exc)
    finally:
        _current.lookup = None
    if result not in RESULTS:  # pyspf's older names ("error", "unknown")
        result = {"error": "temperror", "unknown": "permerror"}.get(result, "permerror")
    return SpfResult(result, identity, domain, explanation)


def check_helo(client_ip: str, helo: str, lookup: SpfLookup,
               limits: SpfLimits = SpfLimits(), receiver: str = "unknown") -> SpfResult:
    """The HELO identity on its own (RFC 7208 2.3): recorded as smtp.helo."""
    if not helo or "." not in helo or helo.startswith("["):  # address literals: none
        return SpfResult("none", "helo", helo or "")
    return check_spf(client_ip, "", helo, lookup, limits, receiver)
