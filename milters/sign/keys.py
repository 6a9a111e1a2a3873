"""Choosing the keys for a From domain, like OpenDKIM's SigningTable and KeyTable (the key
files themselves: milters/core/dkim_keys.py)."""
from __future__ import annotations

from .dkim_sign import SigningKey


def signing_domain(from_domain: str, key_domains: set[str], table: dict[str, str],
                   subdomains: bool) -> tuple[str, str] | None:
    """(signing domain, why) for a From domain, or None: the SigningTable entry of the From
    domain or its nearest listed parent first, then the From domain itself when it has
    keys, then (with `subdomains`) its nearest parent that has keys."""
    labels = from_domain.split(".")
    parents = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    for candidate in parents:
        if candidate in table:
            return table[candidate], f"domains: {candidate} -> {table[candidate]}"
    if from_domain in key_domains:
        return from_domain, "the From domain has keys"
    if subdomains:
        for candidate in parents[1:]:
            if candidate in key_domains:
                return candidate, f"nearest parent with keys ({candidate})"
    return None


def keys_for(domain: str, keys: tuple[SigningKey, ...]) -> list[SigningKey]:
    """Every key of a signing domain: RSA and ed25519 both sign (RFC 8463 4)."""
    return [key for key in keys if key.domain == domain]
