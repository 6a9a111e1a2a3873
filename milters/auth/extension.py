"""How the auth milter plugs into the policy language: its section, its rule action,
`policy explain` lines and the runner for `tests:` cases."""
from __future__ import annotations

from milters.core.message import Envelope, Message
from milters.core.policy.document import (Policy, PolicyExtension, PolicyTest,
                                          decision_failures)
from milters.core.policy.schema import Str

from .decision import decide
from .settings import ACTIONS, EXPECT_SPEC, MILTER, SETTINGS_SPEC, AuthExpectation, AuthSettings


def _decision(policy: Policy, env: Envelope, subject: str) -> tuple[str, str]:
    decision = decide(policy, Message(raw=b"\r\n", envelope=env), subject)
    return decision.action, decision.why


def explain(policy: Policy, env: Envelope, subject: str = "",
            auth: dict[str, str] | None = None) -> list[str]:
    action, why = _decision(policy, env, subject)
    settings: AuthSettings = policy.sections[MILTER]
    lines = [f"auth: {action}  (decided by {why if why.startswith('(') else repr(why)})"]
    if action == "skip":
        lines.append("  - no SPF/DKIM/DMARC checks and no Authentication-Results header; "
                     "forged ones are still removed")
        return lines
    acts = settings.dmarc_actions
    lines.append(f"  - DMARC failures: p=reject -> {acts.reject}, p=quarantine -> "
                 f"{acts.quarantine}, p=none -> {acts.none}"
                 + (" (policy says tag only)" if action == "tag" else ""))
    if settings.dmarc_domains:
        lines.append("  - per-domain overrides: " + ", ".join(sorted(settings.dmarc_domains)))
    lines.append(f"  - DNS temporary errors: {settings.on_temperror} "
                 f"({settings.temperror_reply})")
    return lines


def run_test(policy: Policy, test: PolicyTest, expected: AuthExpectation) -> list[str]:
    msg = test.message
    action, why = _decision(policy, msg.envelope(), msg.subject)
    return decision_failures(MILTER, action, why, expected)


EXTENSION = PolicyExtension(
    name=MILTER,
    settings=SETTINGS_SPEC,
    action=Str(ACTIONS),
    default_action="enforce",
    expect=EXPECT_SPEC,
    run_test=run_test,
    unusable_conditions={"auth": "the auth milter makes the authentication results; its own "
                                 "rules cannot depend on them"},
    explain=explain,
)
