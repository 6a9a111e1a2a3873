"""Login throttling in the Store: 5 failures a minute per login name and per source address.

Every attempt is counted *before* the password is checked (an atomic counters_add), so a burst
of parallel guesses cannot all slip in before the first failure is written; a success then
takes its own count back. A success never clears the counts: one right guess in a password
spray does not unlock the rest. Keys hold a hash of the name or address, so any name (odd
characters, a prefix of another name) maps to one fixed-length key of its own.
"""
from __future__ import annotations

import hashlib
import ipaddress
import unicodedata

from milters.core.store import Store

LIMIT = 5  # failures allowed per WINDOW; the next attempt is refused
WINDOW = 60.0  # seconds a count lives after the last attempt
PREFIX = "console:login:"


def _key(kind: str, value: str) -> str:
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{PREFIX}{kind}:{digest}"


def name_key(name: str) -> str:
    # Alice, ALICE and the NFKC twin of alice are one person to a directory: one count.
    return _key("name", unicodedata.normalize("NFKC", name).casefold())


def source_key(source: str) -> str:
    """IPv6 clients are counted per /64 (one host gets a whole /64 to hop around in)."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return _key("source", source)
    if address.version == 6 and address.ipv4_mapped is None:
        return _key("source", str(ipaddress.ip_network(f"{address}/64", strict=False)))
    mapped = getattr(address, "ipv4_mapped", None)
    return _key("source", str(mapped or address))


class Throttle:
    def __init__(self, store: Store, *, limit: int = LIMIT, window: float = WINDOW) -> None:
        self.store, self.limit, self.window = store, limit, window

    def attempt(self, name: str, source: str, now: float) -> float | None:
        """Count one attempt; None when it may go on, else seconds to wait (a refused
        attempt counts too: hammering keeps the lock closed)."""
        # Both counts in one step: parallel guesses then line up the same way on the name
        # and on the address, so a burst gets exactly `limit` through, never fewer or more.
        counts = self.store.counters_add([name_key(name), source_key(source)], 1,
                                         keep=self.window, now=now)
        return self.window if max(counts) > self.limit else None

    def succeeded(self, name: str, source: str, now: float) -> None:
        """Take the successful attempt's count back (the earlier failures stay)."""
        self.store.counters_add([name_key(name), source_key(source)], -1, keep=self.window,
                                now=now)
