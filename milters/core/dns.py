"""DNS lookups for the milters: one resolver built from the config's `dns:` section, with
answers cached for their TTL (SPF, DKIM keys and DMARC records repeat from message to
message: OpenDKIM and OpenDMARC cache the same way).

Three outcomes, the three RFC 7208/7489 cases: records, no records (NXDOMAIN or an empty
answer: a "void" lookup) and DnsTempError (timeout, SERVFAIL, a reply that does not
parse). Callers turn DnsTempError into temperror; nothing here raises anything else.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from typing import TYPE_CHECKING

from .errors import MailmoatError

if TYPE_CHECKING:
    import dns.message

# dnspython is imported when a Resolver is made: only the auth milter asks DNS, and the
# other processes (serve, ratelimit, attachments, the command line) need not carry it.


class DnsTempError(MailmoatError):
    """The answer could not be had right now; asking again later may work."""


@dataclass(frozen=True)
class DnsSettings:
    # (address, port) pairs; empty: the system resolver (/etc/resolv.conf).
    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 5.0  # for one whole lookup, all servers and retries included
    cache_size: int = 10000  # answers kept (each for its TTL)
    max_cache_ttl: float = 3600.0
    negative_ttl: float = 300.0  # for NXDOMAIN/no data when the SOA gives none


def parse_nameserver(text: str) -> tuple[str, int]:
    """'127.0.0.1', '127.0.0.1:5353', '[::1]:5353' -> (address, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "53"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("a nameserver is an IP address with an optional port, like "
                         "127.0.0.1:5353")
    ipaddress.ip_address(host)  # raises ValueError with the bad text
    return host, int(port)


class _TtlCache:
    """A bounded map whose entries expire; thread-safe (pymilter runs a thread per session)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], now: float) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] <= now:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: tuple[str, str], value: Any, expires: float) -> None:
        with self._lock:
            self._items[key] = (expires, value)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class Resolver:
    """Cached lookups through dnspython, with the config's nameservers and timeout."""

    def __init__(self, settings: DnsSettings = DnsSettings(),
                 clock: Any = time.monotonic) -> None:
        import dns.resolver
        self.settings = settings
        self._clock = clock
        self._cache = _TtlCache(settings.cache_size)
        if settings.nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [host for host, _ in settings.nameservers]
            ports = {host: port for host, port in settings.nameservers}
            resolver.nameserver_ports = ports
            resolver.port = settings.nameservers[0][1]
        else:
            resolver = dns.resolver.Resolver()
        resolver.lifetime = settings.timeout
        resolver.timeout = min(settings.timeout, max(settings.timeout / 2, 1.0))
        resolver.cache = None  # ours keeps negative answers too, per name and type
        self._resolver = resolver

    def lookup(self, name: str, rdtype: str) -> list[Any]:
        """The rdata of `name`'s `rdtype` records ([] when there are none); CNAMEs are
        followed by the server's answer. Raises DnsTempError."""
        key = (name.lower().rstrip("."), rdtype)
        now = self._clock()
        cached = self._cache.get(key, now)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        records, ttl = self._query(key[0], rdtype)
        self._cache.put(key, records, now + min(ttl, self.settings.max_cache_ttl))
        return records

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record as one byte string (its character-strings joined, RFC 7208 3.3)."""
        return [b"".join(r.strings) for r in self.lookup(name, "TXT")]

    def _query(self, name: str, rdtype: str) -> tuple[list[Any], float]:
        import dns.exception
        import dns.resolver
        try:
            answer = self._resolver.resolve(name, rdtype, search=False,
                                            raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            return [], _negative_ttl(exc.response(exc.qnames()[0]) if exc.qnames() else None,
                                     self.settings.negative_ttl)
        except (dns.resolver.LifetimeTimeout, dns.exception.Timeout):
            raise DnsTempError(f"DNS timeout looking up {name} {rdtype}") from None
        except dns.resolver.NoNameservers as exc:  # SERVFAIL, REFUSED, garbage from all
            raise DnsTempError(f"DNS failure looking up {name} {rdtype}: "
                               f"{_first_error(exc)}") from None
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            raise DnsTempError(f"DNS error looking up {name} {rdtype}: "
                               f"{type(exc).__name__}: {exc}") from None
        if answer.rrset is None:
            return [], _negative_ttl(answer.response, self.settings.negative_ttl)
        return list(answer.rrset), float(answer.rrset.ttl)


def _negative_ttl(response: dns.message.Message | None, default: float) -> float:
    """RFC 2308: the SOA's minimum (capped by its TTL) says how long 'none' may be kept."""
    import dns.rdatatype
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return default


def _first_error(exc: Any) -> str:  # a dns.resolver.NoNameservers
    errors = exc.kwargs.get("errors") or []
    if errors:
        server, _tcp, _port, error, *_ = errors[0]
        return f"{server}: {error}"
    return str(exc)
