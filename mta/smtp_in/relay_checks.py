"""SMTP in: what an address alone tells about relaying (syntax, sender-specified routing,
domains with no A-label) and whether a client address is loopback."""
from __future__ import annotations

import functools
import ipaddress

from milters.core.policy.matching import normalize_domain

SMTPUTF8_NEEDED = "553 5.6.7 Must declare SMTPUTF8 to send Unicode addresses"


def recipient_problem(address: str) -> str | None:
    """Why a recipient from a client that may not relay is refused on syntax alone, or
    None: it must be local@domain, the domain without a trailing dot."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or domain.endswith("."):
        return "501 5.1.3 Bad recipient address syntax"
    return None


def sender_routed(address: str) -> bool:
    """Does the address name its own route, beyond its domain? A source route
    (`@a,@b:user@c`), or a local part holding another destination: `user@a@b`,
    `user%b@a` (the percent hack), `b!user@a` (a UUCP bang path), and the same hidden in
    a quoted local part (`"user@b"@a`). Everything before the last '@' is the local
    part: quoted or not, '@', '%' and '!' there are routing to a mail server that honours
    them (Postfix's allow_untrusted_routing = no refuses them all)."""
    if address.startswith("@"):
        return True
    local = address.rpartition("@")[0]
    return "@" in local or "%" in local or "!" in local


def domain_problem(address: str) -> bool:
    """A non-ASCII domain that is no IDNA 2008 name has no A-label: it can be neither
    compared nor routed (RFC 6531 3.2: domains in U-labels must be valid)."""
    domain = address.rpartition("@")[2]
    return not domain.isascii() and not normalize_domain(domain).isascii()


# Parsed once per address, not three or four times per session (EHLO's offers, relay checks).
parsed_ip = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


def is_loopback(ip: str) -> bool:
    try:
        return parsed_ip(ip).is_loopback
    except ValueError:
        return False
