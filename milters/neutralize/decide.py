"""Whether a message is neutralized, and how: internal networks, authenticated users and
trusted domains first, then the policy's rules over the envelope, the subject and what our
auth milter found (read back from its Authentication-Results header)."""
from __future__ import annotations

from dataclasses import dataclass

from milters.core.auth_results import read
from milters.core.message import Envelope, Message
from milters.core.policy.document import Policy
from milters.core.policy.matching import network_matches
from milters.core.policy.rules import Facts

from .settings import MILTER, NeutralizeSettings, Treatment


@dataclass(frozen=True)
class Decision:
    treatment: Treatment | None  # None: the message passes untouched
    why: str  # the rule, or "(internal)", "(authenticated)", "(trusted domain)", "(defaults)"

    @property
    def action(self) -> str:
        return "pass" if self.treatment is None else "neutralize"


def _under(domain: str, parents: tuple[str, ...]) -> bool:
    return any(domain == p or domain.endswith("." + p) for p in parents)


def decide_envelope(policy: Policy, env: Envelope, subject: str,
                    auth: dict[str, str] | None, dmarc_from: str | None = None) -> Decision:
    """The decision from what is known about a message (also for policy explain and test)."""
    settings: NeutralizeSettings = policy.sections[MILTER]
    if settings.skip_internal and network_matches(env.client_address,
                                                  policy.internal_networks):
        return Decision(None, "(internal)")
    if settings.skip_authenticated and env.auth_user:
        return Decision(None, "(authenticated)")
    if auth is not None and auth.get("dmarc") == "pass" and dmarc_from \
            and _under(dmarc_from, settings.trusted_domains):
        return Decision(None, "(trusted domain)")
    facts = Facts.from_envelope(env, policy.internal_networks)
    facts.subject, facts.auth = subject, auth
    decision = policy.decide(MILTER, facts)
    return Decision(settings.treatment_for(decision.action), decision.rule_label)


def decide(policy: Policy, message: Message, authserv_id: str) -> Decision:
    found = read(message.raw_headers(), authserv_id)  # once: an unreadable one is logged once
    return decide_envelope(policy, message.envelope, message.decoded_subject,
                           None if found is None else found.methods,
                           None if found is None else found.dmarc_domain)
