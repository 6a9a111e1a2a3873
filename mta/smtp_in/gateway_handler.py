"""SMTP in: what all connections of one listener share."""
from __future__ import annotations

from typing import Callable

from milters.core.policy.matching import network_matches, normalize_domain

from mta.chain.session import ChainSession
from mta.queue.spool import Queue
from .relay_checks import parsed_ip
from .settings import SmtpSettings


class GatewayHandler:
    """What all connections of one listener share: settings, queue, milter chain factory
    and the connection counts."""

    def __init__(self, settings: SmtpSettings, queue: Queue,
                 chain_factory: Callable[[], ChainSession] | None = None,
                 on_queued: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.chain_factory = chain_factory
        self.on_queued = on_queued  # told each new queue ID (serve wakes delivery with it)
        self.connections: dict[str, int] = {}  # open connections per client IP
        self.open_connections = 0  # their sum, asked for on every message
        # Compared in one form, IDNA 2008 A-labels, so that a Unicode spelling of an IDN
        # relay domain is that domain and a look-alike is not.
        self.relay_domains = tuple(normalize_domain(d) for d in settings.relay_domains)
        # Postfix is stressed when every smtpd process is busy and clients wait in the
        # queue; we refuse at max_connections instead of queueing, so stress must start
        # before that: at a share of the limit.
        self._stress_at = max(1, int(settings.max_connections * settings.stress_share))

    def admit_connection(self, ip: str) -> str | None:
        """Count a new connection; the 421 reply when it is one too many."""
        if self.open_connections >= self.settings.max_connections:
            return f"421 4.7.0 {self.settings.hostname} Error: too many connections"
        if self.connections.get(ip, 0) >= self.settings.max_connections_per_ip:
            return f"421 4.7.0 {self.settings.hostname} Error: too many connections from {ip}"
        self.connections[ip] = self.connections.get(ip, 0) + 1
        self.open_connections += 1
        return None

    def release_connection(self, ip: str) -> None:
        self.open_connections -= 1
        left = self.connections.get(ip, 0) - 1
        if left > 0:
            self.connections[ip] = left
        else:
            self.connections.pop(ip, None)

    def under_stress(self) -> bool:
        return self.open_connections >= self._stress_at

    def relay_domain(self, address: str) -> bool:
        domain = normalize_domain(address.rpartition("@")[2])
        return any(domain == d or domain.endswith("." + d) for d in self.relay_domains)

    def internal(self, ip: str) -> bool:
        try:
            address = parsed_ip(ip)
        except ValueError:
            return False
        return network_matches(address, self.settings.internal_networks)

    def xclient_allowed(self, peer_ip: str) -> bool:
        try:
            peer = parsed_ip(peer_ip)
        except ValueError:
            return False
        return network_matches(peer, self.settings.xclient_networks)
