"""Whether a message gets the auth milter's checks at all: internal networks and
SMTP-authenticated users first, then the policy's rules (light: `policy explain` and
`policy test` use it without loading the checkers)."""
from __future__ import annotations

from dataclasses import dataclass

from milters.core.message import Message
from milters.core.policy.document import Policy
from milters.core.policy.matching import network_matches
from milters.core.policy.rules import Facts

from .settings import MILTER, AuthSettings


@dataclass(frozen=True)
class Decision:
    action: str  # enforce | tag | skip
    why: str  # the rule, or "(internal)", "(authenticated)", "(defaults)"


def decide(policy: Policy, message: Message, subject: str | None = None) -> Decision:
    """`subject` (decoded) stands in for the message's own when given (policy explain)."""
    settings: AuthSettings = policy.sections[MILTER]
    env = message.envelope
    if network_matches(env.client_address, policy.internal_networks):
        return Decision(settings.internal, "(internal)")
    if env.auth_user:
        return Decision(settings.authenticated, "(authenticated)")
    facts = Facts.from_envelope(env, policy.internal_networks)
    facts.subject = message.decoded_subject if subject is None else subject
    decision = policy.decide(MILTER, facts)
    return Decision(decision.action, decision.rule_label)
