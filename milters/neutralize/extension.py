"""How the neutralize milter plugs into the policy language: its section, its rule action
(neutralize, pass, or a mapping of switched actions), `policy explain` lines and `tests:`."""
from __future__ import annotations

from milters.core.message import Envelope, domain_of
from milters.core.policy.document import (Policy, PolicyExtension, PolicyTest,
                                          decision_failures)

from .decide import decide_envelope
from .settings import (ACTION_SPEC, EXPECT_SPEC, MILTER, SETTINGS_SPEC, NeutralizeExpectation,
                       NeutralizeSettings)


def explain(policy: Policy, env: Envelope, subject: str = "",
            auth: dict[str, str] | None = None) -> list[str]:
    # The DMARC domain is the From header's; the sender's domain stands in for it here.
    decision = decide_envelope(policy, env, subject, auth, domain_of(env.mail_from))
    who = decision.why if decision.why.startswith("(") else f"rule '{decision.why}'"
    lines = [f"neutralize: {decision.action}  (decided by {who})"]
    treatment = decision.treatment
    if treatment is None:
        return lines
    settings: NeutralizeSettings = policy.sections[MILTER]
    table = ", ".join(f"{'/'.join(row.match)} -> {row.action}" for row in settings.convert)
    lines += [f"  - links: {treatment.links}; HTML: {treatment.html}",
              f"  - attachments: {treatment.attachments}"
              + (f" ({table})" if treatment.attachments == "convert" else ""),
              f"  - encrypted files: {treatment.encrypted}; a failed conversion: "
              f"{settings.on_failure}; a file no converter can read: "
              f"{settings.on_unreadable}"]
    if auth is None:
        lines.append("  (no --auth given: rules with auth conditions were not matched)")
    return lines


def run_test(policy: Policy, test: PolicyTest, expected: NeutralizeExpectation) -> list[str]:
    msg = test.message
    decision = decide_envelope(policy, msg.envelope(), msg.subject, msg.auth,
                               domain_of(msg.mail_from))
    return decision_failures(MILTER, decision.action, decision.why, expected)


EXTENSION = PolicyExtension(
    name=MILTER,
    settings=SETTINGS_SPEC,
    action=ACTION_SPEC,
    default_action="pass",
    expect=EXPECT_SPEC,
    run_test=run_test,
    explain=explain,
)
