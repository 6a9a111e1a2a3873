"""Which review a message gets: outbound mail only, then the policy's rules asked once for
the whole message (its recipients, subject, attachments and size)."""
from __future__ import annotations

from dataclasses import dataclass, field

from milters.core.message import Envelope
from milters.core.policy.document import Policy
from milters.core.policy.rules import OUTBOUND, Facts, outside_recipients

from .settings import MILTER, Review


@dataclass(frozen=True)
class ReviewDecision:
    review: Review | None  # None: not held
    why: str  # the rule's name, or "(defaults)", "(inbound)", "(bounce)"
    outside: tuple[str, ...] = ()  # recipients outside the policy's own_domains
    trail: list[str] = field(default_factory=list)

    @property
    def action(self) -> str:
        return self.review.kind if self.review is not None else "none"


def needs_groups(policy: Policy) -> bool:
    """Whether a review rule asks for the sender's directory groups (an LDAP look-up)."""
    return any(MILTER in rule.then and rule.when.sender_groups is not None
               for rule in policy.rules)


def review_for(policy: Policy, env: Envelope, subject: str, attachments: list[str],
               size: int, sender_groups: frozenset[str] | None = None) -> ReviewDecision:
    """`subject` decoded; `attachments` the file names; `size` the message's bytes;
    `sender_groups` the sender's directory groups, None when not looked up."""
    facts = Facts.from_envelope(env, policy.internal_networks)
    outside = tuple(outside_recipients(facts.recipients or [], policy.own_domains))
    if facts.direction != OUTBOUND:
        return ReviewDecision(None, "(inbound)", outside)
    if not env.mail_from:
        # A bounce has nobody to notify or to confirm: holding it would lose it.
        return ReviewDecision(None, "(bounce)", outside)
    facts.subject, facts.attachments, facts.size = subject, list(attachments), size
    facts.sender_groups = sender_groups
    decision = policy.decide(MILTER, facts)
    review = decision.action if isinstance(decision.action, Review) else None
    return ReviewDecision(review, decision.rule_label, outside, decision.trail)
