"""Which treatment each recipient's copy gets: SaMMA's order of checks, then the policy's
rules asked once per recipient."""
from __future__ import annotations

import re
from dataclasses import dataclass

from milters.core.message import Envelope, decode_words
from milters.core.policy.document import Policy
from milters.core.policy.matching import network_matches
from milters.core.policy.rules import OUTBOUND, Facts

from .settings import MILTER, AttachmentsSettings


@dataclass(frozen=True)
class Mode:
    mode: str  # encrypt | delete | pass
    why: str  # the rule's name, or "(defaults)", "(inbound)", "(pass_clients)", "(keyword)"


def has_keyword(subject: str, keyword: str) -> bool:
    return bool(keyword) and keyword.lower() in decode_words(subject).lower()


def strip_keyword(subject: str, keyword: str) -> str:
    """The subject without the keyword (decoded text; the caller re-encodes it)."""
    text = decode_words(subject)
    stripped = re.sub(re.escape(keyword), "", text, count=1, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", stripped).strip()


def modes_for(policy: Policy, env: Envelope, subject: str = "") -> dict[str, Mode]:
    """recipient address -> the treatment of that recipient's copy."""
    settings: AttachmentsSettings = policy.sections[MILTER]
    recipients = [r.address for r in env.accepted_recipients()]
    if network_matches(env.client_address, settings.pass_clients):
        return {r: Mode("pass", "(pass_clients)") for r in recipients}
    facts = Facts.from_envelope(env, policy.internal_networks, with_recipients=False)
    facts.subject = decode_words(subject)
    if settings.only_internal_senders and facts.direction != OUTBOUND:
        return {r: Mode("pass", "(inbound)") for r in recipients}
    if has_keyword(subject, settings.subject_keyword):
        return {r: Mode("encrypt", "(keyword)") for r in recipients}
    modes = {}
    for address in recipients:
        facts.recipients = [address]
        decision = policy.decide(MILTER, facts)
        modes[address] = Mode(decision.action, decision.rule_label)
    return modes


def groups(modes: dict[str, Mode]) -> dict[str, list[str]]:
    """mode -> its recipients, in the order the recipients came."""
    grouped: dict[str, list[str]] = {}
    for address, mode in modes.items():
        grouped.setdefault(mode.mode, []).append(address)
    return grouped
