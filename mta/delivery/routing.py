"""Which agent takes a recipient: the per-domain relay routes of gateway.yaml (parent
domains too), else the default route; and the agents those routes name."""
from __future__ import annotations

import encodings.punycode
import re
from dataclasses import dataclass
from pathlib import Path

from milters.core.config import GatewayConfig, RelayTarget
from milters.core.policy.matching import normalize_domain

from .agent import Agent
from .maildir import MaildirDelivery
from .outbound_tls import TlsPolicy
from .relay import SmtpRelay


def canonical_domain(domain: str) -> str | None:
    """A domain's one routing form, its A-labels (IDNA 2008 via normalize_domain); None when
    it has none, or when its Unicode form is not the U-label its A-label stands for: a
    look-alike that only a mapping (full-width letters, IDNA 2003's NFKC) turns into another
    name is not that name."""
    canonical = normalize_domain(domain)
    if not canonical or not canonical.isascii():
        return None
    written = domain.strip().rstrip(".").lower()
    if not written.isascii():
        try:
            labels = [encodings.punycode.punycode_decode(label[4:], "strict")
                      if label.startswith("xn--") else label
                      for label in canonical.split(".")]
        except UnicodeError:
            return None
        if ".".join(labels) != written:
            return None
    return canonical


@dataclass(frozen=True)
class Router:
    """The agent for a recipient: a per-domain route (parent domains too), else the default.
    Route keys and recipient domains are compared in their A-label form only."""

    default: Agent
    routes: dict[str, Agent]

    def __post_init__(self) -> None:
        canonical = {}
        for domain, agent in self.routes.items():
            key = canonical_domain(domain)
            if key is None:
                raise ValueError(f"route domain '{domain}' is not a valid domain name")
            canonical[key] = agent
        object.__setattr__(self, "routes", canonical)

    def close_idle(self, everything: bool = False) -> None:
        for agent in [self.default, *self.routes.values()]:
            agent.close_idle(everything)

    def agent_for(self, recipient: str) -> Agent:
        domain = canonical_domain(recipient.rpartition("@")[2])
        while domain:  # None (no canonical form) matches no route
            if domain in self.routes:
                return self.routes[domain]
            domain = domain.partition(".")[2]
        return self.default


_SMTP_TARGET = re.compile(r"^smtp:\[?([^\]]+?)\]?(?::(\d+))?$")


def agent_for(route: RelayTarget | str, helo: str) -> Agent:
    """The agent for a relay route from the config: maildir:DIR or smtp:[host]:port, with
    the route's outbound TLS policy."""
    route = RelayTarget(route) if isinstance(route, str) else route
    if route.target.startswith("maildir:"):
        return MaildirDelivery(Path(route.target[len("maildir:"):]))
    match = _SMTP_TARGET.match(route.target)
    if not match:
        raise ValueError(f"relay target '{route.target}' is not smtp:[host]:port or "
                         f"maildir:DIR")
    return SmtpRelay(match.group(1), int(match.group(2) or 25), helo=helo,
                     tls=TlsPolicy(route.tls, route.ca_file))


def build_router(config: GatewayConfig) -> Router:
    return Router(agent_for(config.relay_default, config.hostname),
                  {domain: agent_for(route, config.hostname)
                   for domain, route in config.relay_routes.items()})
