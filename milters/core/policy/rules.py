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
    # Recipients outside the policy's own_domains: any present (True) or none (False).
    outside_recipients: bool | None = None
    outside_domains: "CountRange | None" = None  # how many distinct outside domains
    attachments: bool | None = None  # the message has attachments (end of message)
    size: "SizeRange | None" = None  # the message's size in bytes (end of message)
    # The sender's directory groups (LDAP): any one listed, as a DN or a cn.
    sender_groups: tuple[str, ...] | None = None

    def named(self) -> list[str]:
        return [name for name in CONDITIONS if getattr(self, name) is not None]


CONDITIONS = ("direction", "client_ip", "sender", "recipient", "authenticated", "auth", "subject",
              "outside_recipients", "outside_domains", "attachments", "size", "sender_groups")


@dataclass(frozen=True)
class CountRange:
    """`{min: 2}`, `{max: 5}` or both: a whole number within the bounds (inclusive)."""

    min: int | None = None
    max: int | None = None

    def holds(self, value: int) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        return " and ".join(part for part in (
            f"at least {self.min}" if self.min is not None else "",
            f"at most {self.max}" if self.max is not None else "") if part)


@dataclass(frozen=True)
class SizeRange:
    """`{over: 10MB}`, `{under: 1MB}` or both, in bytes (strictly over / under)."""

    over: int | None = None
    under: int | None = None

    def holds(self, value: int) -> bool:
        return (self.over is None or value > self.over) and \
            (self.under is None or value < self.under)

    def __str__(self) -> str:
        return " and ".join(part for part in (
            f"over {self.over} bytes" if self.over is not None else "",
            f"under {self.under} bytes" if self.under is not None else "") if part)


def in_domains(address: str, domains: tuple[str, ...]) -> bool:
    """The address's domain is one of `domains` or below one (sub.example.jp is example.jp's)."""
    domain = address.rpartition("@")[2].rstrip(".").lower()
    return bool(domain) and any(domain == d or domain.endswith("." + d) for d in domains)


def outside_recipients(recipients: list[str], own_domains: tuple[str, ...]) -> list[str]:
    """The recipients whose domain is not ours, in their order."""
    return [r for r in recipients if not in_domains(r, own_domains)]


def outside_domain_count(recipients: list[str], own_domains: tuple[str, ...]) -> int:
    return len({r.rpartition("@")[2].rstrip(".").lower()
                for r in outside_recipients(recipients, own_domains)})


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
    attachments: list[str] | None = None  # attachment file names (known at end of message)
    size: int | None = None  # the message's bytes (known at end of message)
    # The sender's groups, normalized DNs; None: not looked up (no directory here)
    sender_groups: frozenset[str] | None = None

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


def _check(conditions: Conditions, facts: Facts, own_domains: tuple[str, ...] = ()) -> str | None:
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
    return _check_content(conditions, facts, own_domains)


def _check_content(conditions: Conditions, facts: Facts,
                   own_domains: tuple[str, ...]) -> str | None:
    """The conditions on where the mail goes and what it carries (outbound review)."""
    if conditions.outside_recipients is not None or conditions.outside_domains is not None:
        if facts.recipients is None:
            return "recipients are not known at this stage"
        outside = outside_recipients(facts.recipients, own_domains)
        if conditions.outside_recipients is not None and \
                bool(outside) != conditions.outside_recipients:
            return (f"outside recipients: {', '.join(outside)}" if outside else
                    "no recipient is outside own_domains (" + ", ".join(own_domains) + ")")
        count = outside_domain_count(facts.recipients, own_domains)
        if conditions.outside_domains is not None and not conditions.outside_domains.holds(count):
            return f"{count} outside domain(s), rule wants {conditions.outside_domains}"
    if conditions.attachments is not None:
        if facts.attachments is None:
            return "attachments are not known at this stage (only at end of message)"
        if bool(facts.attachments) != conditions.attachments:
            return ("the message has attachments (" + ", ".join(facts.attachments) + ")"
                    if facts.attachments else "the message has no attachments")
    if conditions.size is not None:
        if facts.size is None:
            return "the size is not known at this stage (only at end of message)"
        if not conditions.size.holds(facts.size):
            return f"the message is {facts.size} bytes, rule wants {conditions.size}"
    if conditions.sender_groups is not None:
        if facts.sender_groups is None:
            return "the sender's groups are not known here (needs LDAP: console.ldap, read by " \
                   "the review milter)"
        if not any(group_matches(g, facts.sender_groups) for g in conditions.sender_groups):
            return (f"sender <{facts.sender}> is in none of the groups "
                    + ", ".join(conditions.sender_groups))
    return None


def group_matches(wanted: str, groups: frozenset[str]) -> bool:
    """`wanted` is a normalized DN (has '=') or a cn: a cn matches any group whose first RDN
    is cn=that (case-insensitive)."""
    if "=" in wanted:
        return wanted in groups
    return any(g.split(",", 1)[0] == f"cn={wanted}" for g in groups)


def decide(rules: list[Rule], defaults: dict[str, Any], milter: str, facts: Facts,
           own_domains: tuple[str, ...] = ()) -> Decision:
    trail: list[str] = []
    for rule in rules:
        if milter not in rule.then:
            continue
        why_not = _check(rule.when, facts, own_domains)
        if why_not is None:
            trail.append(f"rule '{rule.name}' (line {rule.line}) matches")
            return Decision(milter, rule.then[milter], rule.name, trail)
        trail.append(f"rule '{rule.name}' (line {rule.line}) does not match: {why_not}")
    trail.append(f"no rule decided; defaults.{milter} applies")
    return Decision(milter, defaults[milter], None, trail)
