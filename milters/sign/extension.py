"""How the sign milter plugs into the policy language: its section, its rule action
(sign | none), `policy explain` lines and `tests:` cases. Without the message's From at
hand, explain and tests take the envelope sender's domain as the From domain."""
from __future__ import annotations

from milters.core.message import Envelope
from milters.core.policy.document import (Policy, PolicyExtension, PolicyTest,
                                          decision_failures)
from milters.core.policy.schema import Str

from .decide import Plan, plan_for
from .settings import ACTIONS, EXPECT_SPEC, MILTER, SETTINGS_SPEC, SignExpectation, SignSettings


def _plan(policy: Policy, env: Envelope, subject: str) -> Plan:
    return plan_for(policy, env, [f"<{env.mail_from}>"] if env.mail_from else [], subject)


def explain(policy: Policy, env: Envelope, subject: str = "",
            auth: dict[str, str] | None = None) -> list[str]:
    settings: SignSettings = policy.sections[MILTER]
    plan = _plan(policy, env, subject)
    who = plan.why if plan.why.startswith("(") else f"rule '{plan.why}'"
    if plan.action != "sign":
        lines = [f"sign: none  (decided by {who}; From taken as the envelope sender)"]
        if plan.why == "(inbound)" and settings.arc.key is not None:
            key = settings.arc.key
            when = "always" if settings.arc.seal == "all" else "when a milter changed it"
            lines.append(f"  - ARC: sealed {when} (arc.seal: {settings.arc.seal}), "
                         f"d={key.domain} s={key.selector}")
        return lines
    expire = f"x= {settings.expire:g}s after t=" if settings.expire else "no x="
    return [f"sign: DKIM d={plan.domain} with "
            + " and ".join(f"{k.selector} ({k.algorithm})" for k in plan.keys)
            + f"  (decided by {who}; From taken as the envelope sender)",
            f"  - c={settings.canonicalization}, t= the signing time, {expire}; over-signed: "
            + ", ".join(settings.oversign)]


def run_test(policy: Policy, test: PolicyTest, expected: SignExpectation) -> list[str]:
    msg = test.message
    plan = _plan(policy, msg.envelope(), msg.subject)
    failures = decision_failures(MILTER, plan.action, plan.why, expected)
    if expected.domain is not None and plan.domain != expected.domain.lower():
        failures.append(f"sign domain is {plan.domain or '(unsigned)'} ({plan.why}), "
                        f"expected {expected.domain or '(unsigned)'}")
    return failures


EXTENSION = PolicyExtension(
    name=MILTER,
    settings=SETTINGS_SPEC,
    action=Str(ACTIONS),
    default_action="sign",
    expect=EXPECT_SPEC,
    run_test=run_test,
    unusable_conditions={"auth": "outbound mail is signed, and auth checks skip it by "
                                 "default; sign by direction, sender, recipient or subject"},
    explain=explain,
)
