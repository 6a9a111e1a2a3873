"""How the attachments milter plugs into the policy language: its section, its rule action
(the treatment of one recipient's copy), `policy explain` lines and `tests:` cases."""
from __future__ import annotations

from milters.core.message import Envelope
from milters.core.policy.document import (Policy, PolicyExtension, PolicyTest,
                                          decision_failures)
from milters.core.policy.schema import Str

from .decide import modes_for
from .settings import (EXPECT_SPEC, MILTER, MODES, SETTINGS_SPEC, AttachmentsExpectation,
                       AttachmentsSettings)


def explain(policy: Policy, env: Envelope, subject: str = "",
            auth: dict[str, str] | None = None) -> list[str]:
    settings: AttachmentsSettings = policy.sections[MILTER]
    lines = []
    for address, mode in modes_for(policy, env, subject).items():
        who = mode.why if mode.why.startswith("(") else f"rule '{mode.why}'"
        lines.append(f"attachments for <{address}>: {mode.mode}  (decided by {who})")
    encrypt = settings.encrypt
    if any(line.split(": ", 1)[1].startswith("encrypt") for line in lines):
        lines.append(f"  - one {encrypt.encryption} ZIP named {encrypt.zip_name}, entry names "
                     f"in {encrypt.names}; the password goes to the {settings.notice.to} in a "
                     f"separate mail ({settings.notice.language})")
    if any(not line.split(": ", 1)[1].startswith("pass") for line in lines):
        lines.append("  - MIME it cannot read with certainty: " + (
            "the whole message is the one attachment, original.eml (on_unparsable: "
            "encrypt_whole)" if settings.on_unparsable == "encrypt_whole" else
            "the message is tempfailed, 451 4.3.0 (on_unparsable: tempfail)"))
    return lines


def run_test(policy: Policy, test: PolicyTest, expected: AttachmentsExpectation) -> list[str]:
    msg = test.message
    first = modes_for(policy, msg.envelope(), msg.subject)[msg.rcpt[0]]
    return decision_failures(MILTER, first.mode, first.why, expected)


def action_check(policy: Policy, action: str) -> str | None:
    settings: AttachmentsSettings = policy.sections[MILTER]
    if action == "offload" and settings.offload.nextcloud is None:
        return ("offload needs attachments.offload.nextcloud (url, user, and password_file "
                "or password_env); add it, or choose encrypt")
    return None


EXTENSION = PolicyExtension(
    name=MILTER,
    settings=SETTINGS_SPEC,
    action=Str(MODES),
    default_action="pass",
    expect=EXPECT_SPEC,
    run_test=run_test,
    action_check=action_check,
    unusable_conditions={"auth": "attachments are treated by sender and recipient (outbound "
                                 "mail); use auth conditions in neutralize rules"},
    explain=explain,
)
