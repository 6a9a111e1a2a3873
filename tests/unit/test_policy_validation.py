"""Broken policy files: every problem reported at once as FILE:LINE:COL: path: problem (got X),
never a traceback, and never a silent fallback."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from milters.core.errors import ConfigError
from milters.core.policy.document import load_policy
from mta.cli import EXTENSIONS

# (policy text, line, the text the error must point at, the message after FILE:LINE:COL:)
CASES = [
    ('ratelimit:\n  exempt_internl: true\n',
     2, 'exempt_internl', "ratelimit.exempt_internl: unknown key; did you mean 'exempt_internal'? (got exempt_internl)"),
    ('ratelimit:\n  exempt_internal: maybe\n',
     2, 'maybe', 'ratelimit.exempt_internal: expected true or false (got maybe)'),
    ('ratelimit:\n  limits:\n    - {name: a, rate: 30/fortnight, burst: 3}\n',
     3, '30/fortnight', 'ratelimit.limits[0].rate: expected a rate like 60/min, 1000/hour or 5/s (got 30/fortnight)'),
    ('ratelimit:\n  limits:\n    - {name: a, rate: 0/min, burst: 3}\n',
     3, '0/min', 'ratelimit.limits[0].rate: a rate must be above zero; to stop limiting, exempt the sender (got 0/min)'),
    ('ratelimit:\n  limits:\n    - {name: a, rate: 5/min}\n',
     3, '{', "ratelimit.limits[0]: missing required key 'burst' (a whole number)"),
    ('ratelimit:\n  limits:\n    - {name: a, rate: 5/min, burst: 2.5}\n',
     3, '2.5', 'ratelimit.limits[0].burst: expected a whole number (got 2.5)'),
    ('ratelimit:\n  limits:\n    - {name: a, rate: 5/min, burst: 2}\n    - {name: a, rate: 6/min, burst: 2}\n',
     3, '- {name: a, rate: 5', 'ratelimit.limits: limit names must be unique; a appears twice'),
    ('ratelimit:\n  limits:\n    - {name: a, key: ip, rate: 5/min, burst: 2}\n',
     3, 'ip', 'ratelimit.limits[0].key: must be one of client_ip, sender, auth_user (got ip)'),
    ('ratelimit:\n  reply: 550 5.7.1 Go away\n',
     2, '550', 'ratelimit.reply: this reply must be temporary (4xx) (got 550 5.7.1 Go away)'),
    ("ratelimit:\n  reply: 'hello'\n",
     2, "'hello'", "ratelimit.reply: an SMTP reply looks like '451 4.7.1 Try again later' (got hello)"),
    ("ratelimit:\n  reply: '451 5.7.1 Mixed'\n",
     2, "'451 5.7.1", "ratelimit.reply: enhanced code 5.7.1 does not match reply class 451 (got 451 5.7.1 Mixed)"),
    ("ratelimit:\n  reply: '451 4.7.1 100% full'\n",
     2, "'451 4.7.1 100%", "ratelimit.reply: '%' is not allowed in reply text (libmilter drops such replies) (got 451 4.7.1 100% full)"),
    ('ratelimit:\n  points: {half_life: soon}\n',
     2, 'soon', 'ratelimit.points.half_life: expected a duration like 30s, 5m, 1h or 2d (got soon)'),
    ('ratelimit:\n  on_store_failure: off\n',
     2, 'off', 'ratelimit.on_store_failure: must be one of tempfail, local (got off)'),
    ('internal_networks: [10.0.0.1/8]\n',
     1, '10.0.0.1/8', 'internal_networks[0]: host bits are set; did you mean 10.0.0.0/8? (got 10.0.0.1/8)'),
    ('internal_networks: [10.0.0.0/33]\n',
     1, '10.0.0.0/33', 'internal_networks[0]: expected an IP address or CIDR network like 192.0.2.0/24 (got 10.0.0.0/33)'),
    ('rules:\n  - name: r\n    when: {sender: [example.jp]}\n    then: {ratelimit: exempt}\n',
     3, 'example.jp', "rules[0].when.sender[0]: a domain needs a leading '@' (write '@example.jp'), an address needs a local part (write 'user@example.jp') (got example.jp)"),
    ('rules:\n  - name: r\n    then: {ratelimit: exmpt}\n',
     3, 'exmpt', "rules[0].then.ratelimit: must be one of enforce, exempt; did you mean 'exempt'? (got exmpt)"),
    ("rules:\n  - name: r\n    when: {recipient: ['@example.jp']}\n    then: {ratelimit: exempt}\n",
     2, 'name: r', "rules[0].when.recipient: a rule that sets ratelimit cannot use 'recipient': rate limits are decided at MAIL FROM, before any recipient is known; move the recipient condition to another rule"),
    ('rules:\n  - name: r\n    then: {}\n',
     2, 'name: r', 'rules[0].then: the rule sets no action, so it can never decide anything; add an action or delete the rule'),
    ('rules:\n  - {name: r, then: {ratelimit: exempt}}\n  - {name: r, then: {ratelimit: enforce}}\n',
     3, '{name: r, then: {ratelimit: enforce}}', 'rules[1].name: duplicate rule name; rule 0 already uses it (got r)'),
    ('rules:\n  - name: r\n    when: {direction: sideways}\n    then: {ratelimit: exempt}\n',
     3, 'sideways', 'rules[0].when.direction: must be one of inbound, outbound (got sideways)'),
    ('rules: {name: r}\n',
     1, '{name', 'rules: expected a list of a mapping of settings (got a mapping)'),
    ('tests:\n  - name: t\n    message: {rcpt: [a@example.jp]}\n    expect: {}\n',
     2, 'name: t', 'tests[0].expect: states no expectation, so it cannot fail'),
    ('tests:\n  - name: t\n    message: {rcpt: [a@example.jp]}\n    expect: {ratelimit: {rule: nope}}\n',
     2, 'name: t', 'tests[0].expect.ratelimit.rule: no rule has this name (got nope)'),
    ('policy_version: 2\n',
     1, '2', 'policy_version: must be at most 1 (got 2)'),
    ('ratelimit:\n  allowlist: []\nratelimit: {}\n',
     3, 'ratelimit', 'ratelimit: duplicate key; it is already set on line 1 (got ratelimit)'),
    ('ratelimit:\n\texempt_internal: true\n',
     2, '\texempt', "(syntax): found character '\\t' that cannot start any token; indent with spaces, YAML does not allow tabs"),
    ('ratelimit: [1, 2\nrules: []\n',
     2, ': []', "(syntax): expected ',' or ']', but got ':' (while parsing a flow sequence at line 1); quote values that contain ':' such as IPv6 addresses (\"::1/128\")"),
    ('- just\n- a list\n',
     1, '- just', '(top): expected a policy mapping (got a list)'),
    ('ratelimit: {allowlist: [192.0.2.0/24], allowlist: []}\n',
     1, 'allowlist: []}', 'ratelimit.allowlist: duplicate key; it is already set on line 1 (got allowlist)'),
    ('rules:\n  - name: r\n    when: {client_ip: []}\n    then: {ratelimit: exempt}\n',
     3, '[]}', 'rules[0].when.client_ip: needs at least 1 item(s)'),
    ('rules:\n  - name: r\n    when: {auth: {dmarc: [fial]}}\n    then: {neutralize: neutralize}\n',
     3, 'fial', "rules[0].when.auth.dmarc[0]: must be one of pass, fail, softfail, neutral, none, temperror, permerror, policy; did you mean 'fail'? (got fial)"),
    ('rules:\n  - name: r\n    when: {auth: {dmark: [fail]}}\n    then: {neutralize: neutralize}\n',
     3, 'dmark', "rules[0].when.auth.dmark: must be one of spf, spf_helo, dkim, dmarc, arc; did you mean 'dmarc'? (got dmark)"),
    ('rules:\n  - name: r\n    when: {subject: ["(unclosed"]}\n    then: {neutralize: neutralize}\n',
     3, '"(unclosed"', 'rules[0].when.subject[0]: not a valid regular expression: missing ), unterminated subpattern at position 0 (got (unclosed)'),
    ('rules:\n  - name: r\n    when: {auth: {dmarc: [fail]}}\n    then: {ratelimit: exempt}\n',
     2, 'name: r', "rules[0].when.auth: a rule that sets ratelimit cannot use 'auth': rate limits are decided at MAIL FROM, before the message is authenticated; move the auth condition to another rule"),
    ('rules:\n  - name: r\n    when: {auth: {dmarc: [fail]}}\n    then: {auth: tag}\n',
     2, 'name: r', "rules[0].when.auth: a rule that sets auth cannot use 'auth': the auth milter makes the authentication results; its own rules cannot depend on them"),
    ('rules:\n  - name: r\n    then: {neutralize: {links: defang, atachments: drop}}\n',
     3, 'atachments', "rules[0].then.neutralize.atachments: unknown key; did you mean 'attachments'? (got atachments)"),
    ('rules:\n  - name: r\n    then: {neutralize: harmless}\n',
     3, 'harmless', 'rules[0].then.neutralize: must be one of neutralize, pass (got harmless)'),
    ('neutralize:\n  convert:\n    - {match: [docx], action: flatten}\n',
     3, 'docx', 'neutralize.convert[0].match[0]: expected a kind (office, pdf, image, archive, text, other), an extension like .docx, a MIME type, or * (got docx)'),
    ('neutralize:\n  encrypted_reply: "451 4.7.1 later"\n',
     2, '"451', 'neutralize.encrypted_reply: this reply must be permanent (5xx) (got 451 4.7.1 later)'),
    ('neutralize:\n  limits: {pages: 0}\n',
     2, '0}', 'neutralize.limits.pages: must be at least 1 (got 0)'),
]


@pytest.mark.parametrize("text, line, token, message", CASES,
                         ids=[case[3][:50] for case in CASES])
def test_each_mistake_names_file_line_column_and_fix(tmp_path: Path, text: str, line: int,
                                                    token: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    column = text.splitlines()[line - 1].index(token.splitlines()[0]) + 1
    with pytest.raises(ConfigError) as caught:
        load_policy(path, EXTENSIONS)
    assert caught.value.problems[0] == f"{path}:{line}:{column}: {message}"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(textwrap.dedent("""\
        internal_networks: [bogus]
        ratelimit:
          exempt_internal: maybe
          limits:
            - {name: a, key: nope, rate: 1/min, burst: 0}
          colour: blue
        """))
    with pytest.raises(ConfigError) as caught:
        load_policy(path, EXTENSIONS)
    lines = [p.split(":", 3)[1:3] for p in caught.value.problems]
    assert lines == [["1", "21"], ["3", "20"], ["5", "22"], ["5", "48"], ["6", "3"]]


def test_non_utf8_nul_and_huge_files_are_refused_clearly(tmp_path: Path) -> None:
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(b"ratelimit:\n  reply: '451 4.7.1 caf\xe9'\n")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"ratelimit: {}\n\x00\n")
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"# " + b"x" * (5 * 1024 * 1024) + b"\n")
    messages = []
    for path in (latin, nul, huge):
        with pytest.raises(ConfigError) as caught:
            load_policy(path, EXTENSIONS)
        messages.append(caught.value.problems[0])
    assert messages[0] == f"{latin}:2:1: (file): not UTF-8 text (byte 34); save the file as UTF-8"
    assert messages[1] == f"{nul}:1:1: (syntax): the file contains NUL bytes; is it really YAML?"
    assert messages[2].startswith(f"{huge}:1:1: (file): ") and "too large" in messages[2]


def test_yaml_booleans_are_not_silently_accepted_as_words(tmp_path: Path) -> None:
    """`on_store_failure: no` must not become False and pass as some default."""
    path = tmp_path / "p.yaml"
    path.write_text("ratelimit:\n  on_store_failure: no\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(path, EXTENSIONS)
    assert "must be one of tempfail, local (got no)" in caught.value.problems[0]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_policy_check_cli_prints_errors_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratelimit:\n  limits:\n    - {name: a, rate: 5/min, burst: x}\n  zzz: 1\n")
    good = tmp_path / "good.yaml"
    good.write_text("ratelimit: {allowlist: [192.0.2.0/24]}\n")
    result = run_cli("policy", "check", str(good), str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stdout == f"{good}: ok (0 rules, 0 tests)\n"
    assert result.stderr.splitlines() == [
        f"{bad}:3:37: ratelimit.limits[0].burst: expected a whole number (got x)",
        f"{bad}:4:3: ratelimit.zzz: unknown key; allowed here: exempt_internal, allowlist, "
        "limits, reply, blocked_reply, points, on_store_failure, store_failure_reply (got zzz)",
    ]


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli("policy", "explain", "--mail-from", "a@b.c").returncode == 2
    assert run_cli("ratelimit", "show", "not-an-ip").returncode == 2
    result = run_cli("milter", "ratelimit", "--listen", "tcp:nowhere")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_offload_without_nextcloud_settings_is_refused_where_it_is_chosen(
        tmp_path: Path) -> None:
    """A rule (or the default) choosing offload with nowhere to offload to would fail every
    such message at run time: the policy is refused up front, at the line that chooses it."""
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent("""\
        rules:
          - name: cloud-for-partners
            when: {recipient: ["@partner.example"]}
            then: {attachments: offload}
        defaults: {attachments: offload}
        """))
    with pytest.raises(ConfigError) as refused:
        load_policy(path, EXTENSIONS)
    problems = refused.value.problems
    assert any(p.startswith(f"{path}:2:") and "rules[0].then.attachments: offload needs "
               "attachments.offload.nextcloud" in p for p in problems), problems
    assert any(p.startswith(f"{path}:5:") and "defaults.attachments" in p for p in problems)
    path.write_text(path.read_text() + textwrap.dedent("""\
        attachments:
          offload:
            nextcloud: {url: "https://cloud.example.jp", user: mm, password_env: NC_PASSWORD}
        """))
    assert load_policy(path, EXTENSIONS).defaults["attachments"] == "offload"
