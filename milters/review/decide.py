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


def review_for(policy: Policy, env: Envelope, subject: str, attachments: list[str],
               size: int) -> ReviewDecision:
    """`subject` decoded; `attachments` the file names; `size` the message's bytes."""
    facts = Facts.from_envelope(env, policy.internal_networks)
    outside = tuple(outside_recipients(facts.recipients or [], policy.own_domains))
    if facts.direction != OUTBOUND:
        return ReviewDecision(None, "(inbound)", outside)
    if not env.mail_from:
        # A bounce has nobody to notify or to confirm: holding it would lose it.
        return ReviewDecision(None, "(bounce)", outside)
    facts.subject, facts.attachments, facts.size = subject, list(attachments), size
    decision = policy.decide(MILTER, facts)
    review = decision.action if isinstance(decision.action, Review) else None
    return ReviewDecision(review, decision.rule_label, outside, decision.trail)
