"""How the ratelimit milter plugs into the policy language: its section, its rule action,
`policy explain` lines and the runner for `tests:` cases."""
from __future__ import annotations

from milters.core.message import Envelope, Recipient
from milters.core.policy.document import (Policy, PolicyExtension, PolicyTest,
                                          decision_failures)
from milters.core.policy.rules import Facts
from milters.core.policy.schema import Str
from milters.core.store import open_store

from .limiter import MILTER, RateLimiter, connection_exemption
from .settings import ACTIONS, EXPECT_SPEC, SETTINGS_SPEC, RatelimitExpectation, RatelimitSettings


def decide(policy: Policy, env: Envelope) -> tuple[str, str, list[str]]:
    """(action, who decided, trail) for a message, as the milter would decide at MAIL FROM."""
    settings: RatelimitSettings = policy.sections[MILTER]
    exemption = connection_exemption(policy, settings, env.client_address)
    if exemption:
        return "exempt", f"({exemption})", [f"client is exempt before any rule: {exemption}"]
    decision = policy.decide(MILTER, Facts.from_envelope(env, policy.internal_networks,
                                                         with_recipients=False))
    return decision.action, decision.rule_label, decision.trail


def _describe_limit(settings: RatelimitSettings) -> list[str]:
    lines = []
    for limit in settings.limits:
        lines.append(f"  limit {limit.name}: {limit.rate}, burst {limit.burst}, "
                     f"counting each {limit.per} by {limit.key}")
    pts = settings.points
    lines.append(f"  spam points: rates halve every {pts.halve_rate_every:g} points, new mail "
                 f"tempfailed at {pts.tempfail_at:g}, points halve every {pts.half_life:g}s")
    return lines


def explain(policy: Policy, env: Envelope, subject: str = "",
            auth: dict[str, str] | None = None) -> list[str]:
    action, who, trail = decide(policy, env)
    lines = [f"ratelimit: {action}  (decided by {who})" if who.startswith("(")
             else f"ratelimit: {action}  (decided by rule '{who}')"]
    lines += [f"  - {step}" for step in trail]
    if action == "enforce":
        lines += _describe_limit(policy.sections[MILTER])
    return lines


def simulate(policy: Policy, test: PolicyTest) -> str:
    """Send the test message `repeat` times at one instant through a fresh in-memory limiter;
    return the SMTP reply the last one got ('250 2.0.0 Ok' when it passed)."""
    limiter = RateLimiter(open_store("memory://"), clock=lambda: 1_000_000.0)
    msg = test.message
    reply = "250 2.0.0 Ok"
    for _ in range(test.repeat):
        env = Envelope(client_ip=msg.client_ip, client_name=msg.client_name, helo=msg.helo)
        session = limiter.session(policy)
        verdict = session.on_connect(env)
        if not verdict.ends_transaction:
            env.mail_from, env.auth_user = msg.mail_from, msg.auth_user
            verdict = session.on_mail(env)
        for address in msg.rcpt if not verdict.ends_transaction else ():
            recipient = Recipient(address)
            env.recipients.append(recipient)
            verdict = session.on_rcpt(env, recipient)
            if verdict.ends_transaction:
                break
        session.on_close(env)
        reply = str(verdict.reply) if verdict.reply else "250 2.0.0 Ok"
    return reply


def run_test(policy: Policy, test: PolicyTest, expected: RatelimitExpectation) -> list[str]:
    msg = test.message
    env = Envelope(client_ip=msg.client_ip, mail_from=msg.mail_from, auth_user=msg.auth_user)
    action, who, _ = decide(policy, env)
    failures = decision_failures(MILTER, action, who, expected)
    if expected.reply is not None:
        reply = simulate(policy, test)
        if not reply.startswith(expected.reply):
            failures.append(f"message {test.repeat} got '{reply}', expected '{expected.reply}...'")
    return failures


EXTENSION = PolicyExtension(
    name=MILTER,
    settings=SETTINGS_SPEC,
    action=Str(ACTIONS),
    default_action="enforce",
    expect=EXPECT_SPEC,
    run_test=run_test,
    unusable_conditions={
        condition: f"rate limits are decided at MAIL FROM, before {what}; move the "
                   f"{condition} condition to another rule"
        for condition, what in (("recipient", "any recipient is known"),
                                ("subject", "the subject is known"),
                                ("auth", "the message is authenticated"))},
    explain=explain,
)
