"""SaMMA-style matching of addresses and client networks.

Addresses are tried from the most specific level to the least: the exact address, then
'@domain', then each parent domain ('@sub.example.jp' -> '@example.jp' -> '@jp'), then '*'.
The first level at which any pattern matches decides; at that level a '!' pattern wins,
so '!@hr.example.jp' carves a department out of '@example.jp'.

Networks follow the same idea: the longest matching prefix decides, '!' wins at equal length.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

import idna

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_domain(domain: str) -> str:
    """Lower-case, drop a trailing dot, and turn a non-ASCII name into its IDNA 2008
    A-labels (UTS 46 mapping first, as mail clients type names): 例え.jp is xn--r8jz45g.jp,
    and a look-alike such as ex\u0430mple.jp (a Cyrillic а) gets an A-label of its own, never
    example.jp's. A name IDNA 2008 refuses stays non-ASCII: it matches nothing ASCII
    (callers that must route it refuse it instead). Not Python's "idna" codec: that is
    IDNA 2003, which maps ß to ss and so calls straße.de strasse.de."""
    domain = domain.strip().rstrip(".").lower()
    if domain and not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            pass  # not a name IDNA 2008 allows; it can still match itself literally
    return domain


def normalize_address(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    return f"{local.lower()}@{normalize_domain(domain)}"


@dataclass(frozen=True)
class AddressPattern:
    """One list entry: kind is 'address', 'domain' or 'any'; negated for '!' entries."""

    kind: str
    value: str
    negated: bool = False

    def __str__(self) -> str:
        body = {"address": self.value, "domain": "@" + self.value, "any": "*"}[self.kind]
        return ("!" if self.negated else "") + body


def parse_address_pattern(text: str) -> AddressPattern:
    raw = text.strip()
    negated = raw.startswith("!")
    body = raw[1:].strip() if negated else raw
    if body in ("*", "@"):
        return AddressPattern("any", "*", negated)
    if any(ch.isspace() for ch in body) or not body:
        raise ValueError("an address pattern has no spaces; write user@example.jp or @example.jp")
    if body.startswith("@"):
        domain = normalize_domain(body[1:])
        if not domain or "@" in domain or domain.startswith("."):
            raise ValueError("write a domain as @example.jp")
        return AddressPattern("domain", domain, negated)
    if "@" not in body:
        raise ValueError(f"a domain needs a leading '@' (write '@{body}'), "
                         f"an address needs a local part (write 'user@{body}')")
    local, _, domain = body.rpartition("@")
    if not local or not domain:
        raise ValueError("write an address as user@example.jp")
    return AddressPattern("address", normalize_address(body), negated)


def _address_levels(address: str) -> Iterable[tuple[str, str]]:
    """The (kind, value) keys an address is looked up under, most specific first."""
    normalized = normalize_address(address)
    yield ("address", normalized)
    _, at, domain = normalized.rpartition("@")
    if at:
        labels = domain.split(".")
        for i in range(len(labels)):
            yield ("domain", ".".join(labels[i:]))
    yield ("any", "*")


@dataclass(frozen=True)
class AddressMatch:
    matched: bool
    pattern: AddressPattern | None  # the entry that decided, for `policy explain`


def match_address(address: str | None, patterns: Iterable[AddressPattern]) -> AddressMatch:
    """Match one address against a pattern list with SaMMA's precedence."""
    table: dict[tuple[str, str], list[AddressPattern]] = {}
    for pattern in patterns:
        table.setdefault((pattern.kind, pattern.value), []).append(pattern)
    if address is None:
        return AddressMatch(False, None)
    if address in ("", "<>"):
        # The null sender matches only '*' (and '!*'): it has no domain to look up.
        levels: Iterable[tuple[str, str]] = [("any", "*")]
    else:
        levels = _address_levels(address)
    for level in levels:
        hits = table.get(level)
        if hits:
            negative = next((p for p in hits if p.negated), None)
            if negative is not None:
                return AddressMatch(False, negative)
            return AddressMatch(True, hits[0])
    return AddressMatch(False, None)


@dataclass(frozen=True)
class NetworkPattern:
    network: IPNetwork
    negated: bool = False

    def __str__(self) -> str:
        return ("!" if self.negated else "") + str(self.network)


def parse_network_pattern(text: str) -> NetworkPattern:
    raw = text.strip()
    negated = raw.startswith("!")
    body = raw[1:].strip() if negated else raw
    try:
        network = ipaddress.ip_network(body, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(body, strict=False)
        except ValueError:
            raise ValueError("expected an IP address or CIDR network like 192.0.2.0/24") from None
        raise ValueError(f"host bits are set; did you mean {loose}?") from None
    return NetworkPattern(network, negated)


def match_network(address: IPAddress | None,
                  patterns: Iterable[NetworkPattern]) -> NetworkPattern | None:
    """The pattern that decides for this address (longest prefix, '!' wins ties), or None."""
    if address is None:
        return None
    best: NetworkPattern | None = None
    for pattern in patterns:
        if pattern.network.version != address.version or address not in pattern.network:
            continue
        if (best is None or pattern.network.prefixlen > best.network.prefixlen
                or (pattern.network.prefixlen == best.network.prefixlen and pattern.negated)):
            best = pattern
    return best


def network_matches(address: IPAddress | None, patterns: Iterable[NetworkPattern]) -> bool:
    decided = match_network(address, patterns)
    return decided is not None and not decided.negated
