"""Which mail is signed and with which identity: outbound mail only, the rules' `sign`
action, then the From domain's keys (SigningTable/KeyTable, keys.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.errors import InvalidHeaderDefect, NonPrintableDefect
from email.headerregistry import HeaderRegistry

from milters.core.dkim_keys import check_domain
from milters.core.message import Envelope, decode_words
from milters.core.policy.document import Policy
from milters.core.policy.rules import OUTBOUND, Facts

from .dkim_sign import SigningKey
from .keys import keys_for, signing_domain
from .settings import MILTER, SignSettings

_REGISTRY = HeaderRegistry()
_LINE_END = re.compile(r"\r?\n")


@dataclass(frozen=True)
class Plan:
    action: str  # sign | none
    why: str  # the rule's name, "(defaults)", "(inbound)", or why nothing can sign
    domain: str = ""  # d=; "" = unsigned
    keys: list[SigningKey] = field(default_factory=list)


def from_domain(values: list[str]) -> tuple[str | None, str]:
    """(the one author's domain, "") or (None, why not). One From field holding exactly one
    mailbox that parses without defects (RFC 5322 3.6.2); anything else is left unsigned:
    a domain we guessed from a malformed From is not one to vouch for."""
    if len(values) != 1:
        return None, f"{len(values)} From fields"
    header = _REGISTRY("From", _LINE_END.sub("", values[0]))
    bad = [d for d in header.defects if isinstance(d, (InvalidHeaderDefect, NonPrintableDefect))]
    if bad:
        return None, f"From does not parse ({bad[0]})"
    addresses = header.addresses
    if len(addresses) != 1:
        return None, f"From holds {len(addresses)} addresses"
    try:
        return check_domain(addresses[0].domain), ""
    except ValueError:
        return None, f"From domain {addresses[0].domain!r} is not a domain name"


def plan_for(policy: Policy, env: Envelope, from_values: list[str], subject: str = "") -> Plan:
    settings: SignSettings = policy.sections[MILTER]
    facts = Facts.from_envelope(env, policy.internal_networks)
    if facts.direction != OUTBOUND:
        return Plan("none", "(inbound)")
    facts.subject = decode_words(subject)
    decision = policy.decide(MILTER, facts)
    if decision.action != "sign":
        return Plan("none", decision.rule_label)
    domain, problem = from_domain(from_values)
    if domain is None:
        return Plan("none", f"(unsigned: {problem})")
    chosen = signing_domain(domain, settings.key_domains, settings.table, settings.subdomains)
    if chosen is None:
        return Plan("none", f"(unsigned: no key for {domain})")
    return Plan("sign", decision.rule_label, chosen[0], keys_for(chosen[0], settings.keys))
