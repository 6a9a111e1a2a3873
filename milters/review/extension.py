"""How the review milter plugs into the policy language: its section, its rule action
(delay, confirm, approve or none), `policy explain` lines and `tests:` cases."""
from __future__ import annotations

from milters.core.message import Envelope, decode_words
from milters.core.policy.document import (Policy, PolicyExtension, PolicyTest, TestMessage,
                                          decision_failures)

from .decide import review_for
from .settings import (ACTION_SPEC, EXPECT_SPEC, MILTER, SETTINGS_SPEC, ReviewExpectation,
                       ReviewSettings)


def _decide(policy: Policy, message: TestMessage):  # type: ignore[no-untyped-def]
    return review_for(policy, message.envelope(), decode_words(message.subject),
                      list(message.attachments), message.size)


def explain_message(policy: Policy, message: TestMessage) -> list[str]:
    decision = _decide(policy, message)
    who = decision.why if decision.why.startswith("(") else f"rule '{decision.why}'"
    lines = [f"review: {decision.action}  (decided by {who})"]
    if any(MILTER in rule.then for rule in policy.rules):  # else the trail says nothing
        lines += [f"  - {step}" for step in decision.trail]
    if decision.review is not None:
        settings: ReviewSettings = policy.sections[MILTER]
        lines.append(f"  - {decision.review}; notices in {settings.language}")
        if decision.outside:
            lines.append("  - outside recipients: " + ", ".join(decision.outside))
    return lines


def explain(policy: Policy, env: Envelope, subject: str = "",
            auth: dict[str, str] | None = None) -> list[str]:
    """Without content: as a message with no attachments."""
    return explain_message(policy, TestMessage(client_ip=env.client_ip or "192.0.2.1",
                                               mail_from=env.mail_from or "",
                                               rcpt=tuple(r.address for r in env.recipients),
                                               auth_user=env.auth_user, subject=subject))


def run_test(policy: Policy, test: PolicyTest, expected: ReviewExpectation) -> list[str]:
    decision = _decide(policy, test.message)
    return decision_failures(MILTER, decision.action, decision.why, expected)


EXTENSION = PolicyExtension(
    name=MILTER,
    settings=SETTINGS_SPEC,
    action=ACTION_SPEC,
    default_action="none",
    expect=EXPECT_SPEC,
    run_test=run_test,
    unusable_conditions={"auth": "review does not read authentication results (it holds "
                                 "our own outbound mail); hold by sender, recipients and "
                                 "content"},
    explain=explain,
    explain_message=explain_message,
)
