"""Ordered policy rules: `when` conditions, `then` actions, and explanations of each decision.

For each milter, the first rule that matches *and names an action for that milter* decides;
when no rule does, the policy's `defaults` decide. Every evaluation keeps a trail of why each
earlier rule did not match, which `mailmoat policy explain` prints.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..message import Envelope
from .matching import (AddressPattern, IPAddress, NetworkPattern, match_address, match_network,
                       network_matches)

INBOUND, OUTBOUND = "inbound", "outbound"


@dataclass(frozen=True)
class Conditions:
    """All present conditions must hold; an absent one does not constrain."""

    direction: str | None = None
    client_ip: tuple[NetworkPattern, ...] | None = None
    sender: tuple[AddressPattern, ...] | None = None
    recipient: tuple[AddressPattern, ...] | None = None
    authenticated: bool | None = None
    # method -> results that match, e.g. {"dmarc": ("fail", "none")}: every listed method's
    # result must be one of its list (known only at end of message, from our own
    # Authentication-Results header).
    auth: dict[str, tuple[str, ...]] | None = None
    subject: tuple[re.Pattern[str], ...] | None = None  # any pattern found in the subject

    def named(self) -> list[str]:
        return [name for name in CONDITIONS if getattr(self, name) is not None]


CONDITIONS = ("direction", "client_ip", "sender", "recipient", "authenticated", "auth", "subject")


@dataclass(frozen=True)
class Rule:
    name: str
    when: Conditions
    then: dict[str, Any]  # milter name -> that milter's action for this rule
    line: int = 0


@dataclass
class Facts:
    """What is known about a message when a decision is made; None means not known yet."""

    client_ip: IPAddress | None = None
    sender: str | None = None
    recipients: list[str] | None = None
    auth_user: str | None = None
    direction: str = INBOUND
    auth: dict[str, str] | None = None  # method -> result (a method not checked: "none")
    subject: str | None = None  # decoded

    @classmethod
    def from_envelope(cls, env: Envelope, internal: tuple[NetworkPattern, ...],
                      with_recipients: bool = True) -> "Facts":
        address = env.client_address
        outbound = bool(env.auth_user) or network_matches(address, internal)
        return cls(client_ip=address, sender=env.mail_from, auth_user=env.auth_user,
                   recipients=[r.address for r in env.accepted_recipients()]
                   if with_recipients else None,
                   direction=OUTBOUND if outbound else INBOUND)


@dataclass
class Decision:
    milter: str
    action: Any
    rule: str | None  # None = the policy's defaults decided
    trail: list[str] = field(default_factory=list)

    @property
    def rule_label(self) -> str:
        return self.rule if self.rule is not None else "(defaults)"


def _check(conditions: Conditions, facts: Facts) -> str | None:
    """None when every condition holds, else the reason the first failing one fails."""
    if conditions.direction is not None and facts.direction != conditions.direction:
        return f"direction is {facts.direction}, rule wants {conditions.direction}"
    if conditions.authenticated is not None and bool(facts.auth_user) != conditions.authenticated:
        return "client is " + ("" if facts.auth_user else "not ") + "SMTP-authenticated"
    if conditions.client_ip is not None:
        decided = match_network(facts.client_ip, conditions.client_ip)
        if decided is None or decided.negated:
            how = f"excluded by {decided}" if decided else "in none of the listed networks"
            return f"client IP {facts.client_ip} is {how}"
    if conditions.sender is not None:
        if facts.sender is None:
            return "the sender is not known at this stage"
        hit = match_address(facts.sender, conditions.sender)
        if not hit.matched:
            how = f"excluded by {hit.pattern}" if hit.pattern else "matches no entry"
            return f"sender <{facts.sender}> {how}"
    if conditions.recipient is not None:
        if facts.recipients is None:
            return "recipients are not known at this stage"
        hits = [match_address(rcpt, conditions.recipient) for rcpt in facts.recipients]
        if not any(hit.matched for hit in hits):
            return f"no recipient matches ({', '.join(facts.recipients) or 'none'})"
    if conditions.auth is not None:
        if facts.auth is None:
            return "authentication results are not known (at this stage, or no auth milter ran)"
        for method, wanted in conditions.auth.items():
            got = facts.auth.get(method, "none")
            if got not in wanted:
                return f"{method}={got}, rule wants {method}={'|'.join(wanted)}"
    if conditions.subject is not None:
        if facts.subject is None:
            return "the subject is not known at this stage"
        if not any(p.search(facts.subject) for p in conditions.subject):
            return f"subject matches none of the {len(conditions.subject)} pattern(s)"
    return None


def decide(rules: list[Rule], defaults: dict[str, Any], milter: str, facts: Facts) -> Decision:
    trail: list[str] = []
    for rule in rules:
        if milter not in rule.then:
            continue
        why_not = _check(rule.when, facts)
        if why_not is None:
            trail.append(f"rule '{rule.name}' (line {rule.line}) matches")
            return Decision(milter, rule.then[milter], rule.name, trail)
        trail.append(f"rule '{rule.name}' (line {rule.line}) does not match: {why_not}")
    trail.append(f"no rule decided; defaults.{milter} applies")
    return Decision(milter, defaults[milter], None, trail)
