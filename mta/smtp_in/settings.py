"""SMTP in: the settings one listener runs with, and how the config's smtpd_* keys and TLS
files become them."""
from __future__ import annotations

import ssl
from dataclasses import dataclass

from milters.core.config import SmtpdLimits
from milters.core.policy.matching import AddressPattern, NetworkPattern

from .users import UserFile


@dataclass(frozen=True)
class SmtpSettings:
    hostname: str
    internal_networks: tuple[NetworkPattern, ...]
    relay_domains: tuple[str, ...] = ()
    xclient_networks: tuple[NetworkPattern, ...] = ()
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_header_bytes: int = 1024 * 1024
    max_hops: int = 50  # Received: headers that mean a mail loop (Postfix's hopcount_limit)
    # Postfix's smtpd_timeout: the idle limit between reads, and the deadline for a whole
    # command line; for DATA the deadline grows by a second per min_data_rate bytes
    # (smtpd_min_data_rate). Under stress (open connections at stress_share of
    # max_connections) stress_timeout applies instead, as Postfix's ${stress?{10}:{300}}s.
    timeout: float = 300.0
    stress_timeout: float = 10.0
    min_data_rate: float = 500.0
    stress_share: float = 0.8
    max_connections: int = 200
    max_connections_per_ip: int = 20
    tls_context: ssl.SSLContext | None = None  # STARTTLS is offered when set
    # Who exists in the relay domains (SaMMA patterns); empty: every address is accepted.
    valid_recipients: tuple[AddressPattern, ...] = ()
    loopback_only: bool = False  # the re-injection listener: local notices and split copies
    users: UserFile | None = None  # SMTP AUTH is offered when set




def smtpd_limits(limits: SmtpdLimits) -> dict[str, float]:
    """The SmtpSettings fields that come from the config's smtpd_* keys."""
    return {"timeout": limits.timeout, "stress_timeout": limits.stress_timeout,
            "min_data_rate": float(limits.min_data_rate), "stress_share": limits.stress_share}


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
