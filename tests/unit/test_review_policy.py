"""The review action and the content conditions in the policy language: every form read,
every mistake refused at its FILE:LINE:COL with the fix, `policy explain` and `policy test`
saying which review applies and why."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from milters.core.errors import ConfigError
from milters.core.policy.document import TestMessage, load_policy_text
from milters.core.policy.schema import parse_size
from milters.review.extension import explain_message
from milters.review.settings import Approver, Review
from mta.cli import EXTENSIONS

ROOT = Path(__file__).resolve().parents[2]
HEAD = "internal_networks: [10.0.0.0/8]\nown_domains: [example.jp]\nrules:\n"


def rule(then: str, when: str = "{direction: outbound}") -> str:
    return HEAD + f"  - name: r\n    when: {when}\n    then: {{review: {then}}}\n"


def action(then: str) -> object:
    return load_policy_text(rule(then), EXTENSIONS).rules[0].then["review"]


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_policy_text(text, EXTENSIONS, source="p.yaml")
    return str(caught.value)


def test_each_form_of_the_action_is_read() -> None:
    assert action("none") == "none"
    assert action("{delay: 5m}") == Review("delay", 300.0, "send")
    assert action("{confirm: true, timeout: 2h}") == Review("confirm", 7200.0, "cancel")
    assert action("{confirm: true}") == Review("confirm", 86400.0, "cancel")
    assert action("{approve: {approvers: [Boss@Example.jp, role:admin], timeout: 8h, "
                  "on_timeout: escalate, escalate_to: [cio@example.jp]}}") == Review(
        "approve", 28800.0, "escalate",
        (Approver("address", "boss@example.jp"), Approver("role", "admin")),
        (Approver("address", "cio@example.jp"),), False)


@pytest.mark.parametrize("then,wanted", [
    ("{delay: 5m, confirm: true}", "exactly one of delay, confirm, approve (got delay, confirm)"),
    ("{}", "exactly one of delay, confirm, approve (got none)"),
    ("{confirm: false}", "write review: none"),
    ("{delay: 5m, timeout: 1h}", "timeout belongs to confirm"),
    ("{delay: 31d}", "longer than 30 days"),
    ("{delay: soon}", "expected a duration"),
    ("{dealy: 5m}", "did you mean 'delay'?"),
    ("{approve: {approvers: [managers]}}", "role:ROLE or manager"),
    ("{approve: {approvers: [role:boss]}}", "role:boss is not a console role"),
    ("{approve: {approvers: ['@example.jp']}}", "patterns like @example.jp cannot approve"),
    ("{approve: {approvers: [\"a@b.jp\\nBcc: x@y\"]}}", "expected a plain address"),
    ("{approve: {approvers: []}}", "needs at least 1 item"),
    ("{approve: {approvers: [a@example.jp], on_timeout: escalate}}",
     "on_timeout: escalate needs escalate_to"),
    ("{approve: {approvers: [a@example.jp], escalate_to: [b@example.jp]}}",
     "escalate_to is only used with on_timeout: escalate"),
    ("{approve: {approvers: [a@example.jp], on_timeout: explode}}",
     "must be one of send, cancel, escalate"),
    ("maybe", "expected none, or a mapping: {delay: 5m}"),
])
def test_a_wrong_action_is_refused_at_its_place_with_the_fix(then: str, wanted: str) -> None:
    text = problems(rule(then))
    assert "p.yaml:6:" in text and "rules[0].then.review" in text, text
    assert wanted in text, text


@pytest.mark.parametrize("when,wanted", [
    ("{outside_domains: {}}", "name min, max or both"),
    ("{outside_domains: {min: 3, max: 2}}", "no count can match"),
    ("{size: {over: 10MB, under: 1MB}}", "no size can match"),
    ("{size: {over: lots}}", "expected a size like 500KB"),
    ("{attachments: maybe}", "expected true or false"),
    ("{auth: {dmarc: [fail]}}", "review does not read authentication results"),
])
def test_a_wrong_condition_is_refused_with_the_fix(when: str, wanted: str) -> None:
    assert wanted in problems(rule("{delay: 5m}", when))


def test_outside_conditions_without_own_domains_are_refused() -> None:
    text = rule("{delay: 5m}", "{outside_recipients: true}").replace(
        "own_domains: [example.jp]\n", "")
    assert "need own_domains" in problems(text)
    assert "expected a mail domain" in problems(rule("{delay: 5m}").replace(
        "[example.jp]", "['a b']"))


def test_sizes_count_in_1024s_and_refuse_nonsense() -> None:
    assert parse_size("10MB") == 10 * 1024 * 1024 == parse_size("10 mib")
    assert parse_size("500") == 500 and parse_size("1.5k") == 1536
    for bad in ("", "-1MB", "10XB", "1e9", "9" * 20 + "GB"):
        with pytest.raises(ValueError):
            parse_size(bad)


POLICY = HEAD + """\
  - name: big
    when: {direction: outbound, size: {over: 10MB}}
    then: {review: {approve: {approvers: [boss@example.jp]}}}
  - name: files-out
    when: {direction: outbound, outside_recipients: true, attachments: true}
    then: {review: {delay: 5m}}
  - name: many-domains
    when: {direction: outbound, outside_domains: {min: 2}, subject: ["(?i)confidential|社外秘"]}
    then: {review: {confirm: true}}
  - name: internal-never
    when: {outside_recipients: false}
    then: {review: none}
"""


def decided(**message: object) -> list[str]:
    policy = load_policy_text(POLICY, EXTENSIONS)
    base = {"client_ip": "10.1.0.5", "mail_from": "taro@example.jp"}
    return explain_message(policy, TestMessage(**{**base, **message}))  # type: ignore[arg-type]


def test_explain_names_the_review_the_rule_and_why_the_earlier_rules_did_not_match() -> None:
    lines = decided(rcpt=("a@customer.example",), attachments=("見積.pdf",))
    assert lines[0] == "review: delay  (decided by rule 'files-out')"
    assert any("rule 'big' (line 4) does not match: the message is 10240 bytes, rule wants "
               "over 10485760 bytes" in line for line in lines), lines
    assert "  - delay 5m, then send; notices in ja" in lines
    assert "  - outside recipients: a@customer.example" in lines


@pytest.mark.parametrize("message,first", [
    ({"rcpt": ("a@customer.example",), "size": 11 * 1024 * 1024},
     "review: approve  (decided by rule 'big')"),
    ({"rcpt": ("a@one.example", "b@two.example"), "subject": "=?UTF-8?B?56S+5aSW56eY?="},
     "review: confirm  (decided by rule 'many-domains')"),
    ({"rcpt": ("a@one.example", "b@one.example"), "subject": "社外秘"},
     "review: none  (decided by (defaults))"),  # one outside domain only
    ({"rcpt": ("a@example.jp", "b@sales.example.jp"), "attachments": ("a.pdf",)},
     "review: none  (decided by rule 'internal-never')"),  # subdomains are ours
    ({"rcpt": ("a@customer.example",), "attachments": ("a.pdf",), "client_ip": "192.0.2.1"},
     "review: none  (decided by (inbound))"),
    ({"rcpt": ("a@customer.example",), "attachments": ("a.pdf",), "mail_from": ""},
     "review: none  (decided by (bounce))"),
    ({"rcpt": ("a@example.jp.evil.example",), "attachments": ("a.pdf",)},
     "review: delay  (decided by rule 'files-out')"),  # our name inside theirs is theirs
])
def test_which_review_applies(message: dict[str, object], first: str) -> None:
    assert decided(**message)[0] == first


def test_the_cli_explains_and_tests_a_review_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY + """\
tests:
  - name: a file to a customer waits 5 minutes
    message: {client_ip: 10.1.0.5, mail_from: t@example.jp, rcpt: [a@c.example],
              attachments: [a.pdf]}
    expect: {review: {action: delay, rule: files-out}}
  - name: a wrong expectation fails
    message: {client_ip: 10.1.0.5, mail_from: t@example.jp, rcpt: [a@c.example], size: 20MB}
    expect: {review: {action: confirm}}
""")
    run = [sys.executable, "-m", "mta.cli", "policy"]
    tested = subprocess.run(run + ["test", str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert tested.returncode == 1, tested.stdout + tested.stderr
    assert "ok   " in tested.stdout and "1 passed, 1 failed" in tested.stdout
    assert "review action is approve (by big), expected confirm" in tested.stdout
    explained = subprocess.run(run + ["explain", "--policy", str(path), "--mail-from",
                                      "t@example.jp", "--rcpt", "a@c.example", "--client-ip",
                                      "10.1.0.5", "--attachment", "見積.pdf", "--size", "2MB"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert explained.returncode == 0, explained.stderr
    assert "review: delay  (decided by rule 'files-out')" in explained.stdout
    bad = subprocess.run(run + ["explain", "--policy", str(path), "--mail-from", "t@example.jp",
                                "--rcpt", "a@c.example", "--size", "huge"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected a size like" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_commented_review_example_of_the_ppap_policy_works_when_uncommented() -> None:
    text = (ROOT / "policies" / "ppap-outbound.yaml").read_text()
    start, end = text.index("#   - name: files-to-outside-wait"), text.index("\n\nrules:")
    rules = "\n".join(line[2:] for line in text[start:end].splitlines())
    text = text.replace("# own_domains:", "own_domains:").replace("# review: {", "review: {")
    text = text.replace("\nrules:\n", "\nrules:\n" + rules + "\n", 1)
    policy = load_policy_text(text, EXTENSIONS)
    assert [r.name for r in policy.rules][:3] == ["files-to-outside-wait",
                                                  "big-files-need-approval",
                                                  "several-companies-confirm"]
    lines = explain_message(policy, TestMessage(client_ip="10.1.0.10", mail_from="t@example.jp",
                                                rcpt=("b@customer.example",),
                                                attachments=("a.pdf",)))
    assert lines[0] == "review: delay  (decided by rule 'files-to-outside-wait')"
