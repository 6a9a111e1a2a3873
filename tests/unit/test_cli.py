"""The command line as an admin uses it: shipped policies pass their own tests, explain says
why, `policy test` fails when an expectation is wrong, ratelimit show/reset work on the store."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milters.core.errors import ConfigError
from milters.core.policy.document import load_policy_text
from milters.core.policy.holder import PolicyHolder
from milters.core.store import open_store
from milters.ratelimit.limiter import RateLimiter
from mta.cli import EXTENSIONS, read_policy
from tests.conftest import ROOT

POLICIES = sorted((ROOT / "policies").glob("*.yaml"))


def mailmoat(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_there_is_one_policy_per_deployment() -> None:
    names = {path.name for path in POLICIES}
    assert {"default.yaml", "inbound-gateway.yaml", "ppap-outbound.yaml",
            "postfix-milters.yaml"} <= names


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_shipped_policies_pass_check_and_their_own_tests(path: Path) -> None:
    check = mailmoat("policy", "check", str(path))
    assert check.returncode == 0, check.stderr
    result = mailmoat("policy", "test", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    tests = read_policy(path).tests
    assert len(tests) >= 3
    assert result.stdout.splitlines()[-1] == f"{len(tests)} passed, 0 failed"


def test_policy_test_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "ratelimit:\n  limits: [{name: m, rate: 1/min, burst: 2}]\n"
        "tests:\n"
        "  - name: two pass\n"
        "    message: {client_ip: 198.51.100.1, mail_from: a@b.example, rcpt: [c@d.example]}\n"
        "    repeat: 2\n"
        "    expect: {ratelimit: {reply: '250'}}\n"
        "  - name: wrongly expects the third to pass\n"
        "    message: {client_ip: 198.51.100.1, mail_from: a@b.example, rcpt: [c@d.example]}\n"
        "    repeat: 3\n"
        "    expect: {ratelimit: {reply: '250', action: exempt}}\n")
    result = mailmoat("policy", "test", str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"ok   {path}:4: two pass",
        f"FAIL {path}:8: wrongly expects the third to pass",
        "     ratelimit action is enforce (by (defaults)), expected exempt",
        "     message 3 got '451 4.7.1 Too much mail from your address; slow down and try "
        "again later', expected '250...'",
        "1 passed, 1 failed",
    ]


def test_explain_names_the_rule_and_why_earlier_ones_did_not_match() -> None:
    policy = ROOT / "policies" / "inbound-gateway.yaml"
    result = mailmoat("policy", "explain", "--policy", str(policy), "--client-ip", "192.0.2.3",
                      "--mail-from", "orders@partner.example", "--rcpt", "sales@example.jp")
    assert result.returncode == 0, result.stderr
    assert "ratelimit: exempt  (decided by rule 'partner-batches')" in result.stdout
    other = mailmoat("policy", "explain", "--policy", str(policy), "--client-ip", "198.51.100.9",
                     "--mail-from", "orders@partner.example", "--rcpt", "sales@example.jp")
    lines = other.stdout.splitlines()
    rule_line = next(number for number, text in enumerate(policy.read_text().splitlines(), 1)
                     if "- name: partner-batches" in text)
    assert "ratelimit: enforce  (decided by (defaults))" in lines
    assert any(f"rule 'partner-batches' (line {rule_line}) does not match: client IP 198.51.100.9 is in "
               "none of the listed networks" in line for line in lines)
    assert "  limit client-messages: 20/min, burst 20, counting each message by client_ip" in lines


def test_explain_on_embedded_defaults_from_any_directory(tmp_path: Path) -> None:
    result = mailmoat("policy", "explain", "--client-ip", "127.0.0.1", "--mail-from",
                      "app@example.jp", "--rcpt", "x@example.com", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ratelimit: exempt  (decided by (internal network))" in result.stdout


def test_ratelimit_show_and_reset_on_the_configured_store(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("ratelimit:\n  limits: [{name: m, rate: 1/hour, burst: 5}]\n")
    config = tmp_path / "gw.yaml"
    config.write_text("store: sqlite:///state.db\npolicy: policy.yaml\n")
    from tests.unit.test_ratelimit_limiter import send
    store = open_store(f"sqlite:///{tmp_path}/state.db")
    limiter = RateLimiter(store)
    loaded = read_policy(policy)
    for _ in range(3):
        send(limiter, loaded, ip="198.51.100.7", rejected=["nobody@example.jp"])
    send(limiter, loaded, ip="198.51.100.8")
    store.close()

    shown = mailmoat("ratelimit", "show", "198.51.100.7", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("ip 198.51.100.7  m       3.0 of 5 used; updated ")
    assert lines[1].startswith("ip 198.51.100.7  points  6.0 (limits at 66% speed); updated ")
    everything = mailmoat("ratelimit", "show", "--config", str(config)).stdout
    assert "198.51.100.8" in everything and "198.51.100.7" in everything

    reset = mailmoat("ratelimit", "reset", "198.51.100.7", "--config", str(config))
    assert reset.stdout == "198.51.100.7: removed 2 record(s); it starts afresh\n"
    again = mailmoat("ratelimit", "show", "198.51.100.7", "--config", str(config))
    assert again.stdout == "nothing recorded for 198.51.100.7\n"
    assert "198.51.100.8" in mailmoat("ratelimit", "show", "--config", str(config)).stdout


def test_show_reports_an_unreachable_store_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("{}\n")
    config = tmp_path / "gw.yaml"
    config.write_text("store: redis://127.0.0.1:1/0\nstore_timeout: 1s\npolicy: policy.yaml\n")
    result = mailmoat("ratelimit", "show", "--config", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "127.0.0.1:1" in result.stderr


def test_holder_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("ratelimit: {allowlist: [192.0.2.0/24]}\n")
    holder = PolicyHolder(path, read_policy)
    first = holder.current
    path.write_text("ratelimit: {allowlist: [not-a-network]}\n")
    assert holder.reload("test") is False
    assert holder.current is first
    time.sleep(0.01)
    path.write_text("ratelimit: {allowlist: [198.51.100.0/24]}\n")
    assert holder.reload_if_changed() is True
    assert str(holder.current.sections["ratelimit"].allowlist[0]) == "198.51.100.0/24"
    assert holder.reload_if_changed() is False  # nothing changed since


yaml_ish = st.text(alphabet=st.sampled_from(list("ratelimit: -[]{}\n\t#'\"!@*&,.0123456789/")),
                   max_size=80)


@settings(max_examples=300, deadline=None)
@given(yaml_ish)
def test_any_text_gives_a_policy_or_positioned_errors_never_a_crash(text: str) -> None:
    try:
        load_policy_text(text, EXTENSIONS, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems and all(p.startswith("fuzz.yaml:") for p in exc.problems)


@pytest.mark.parametrize("words", [[], ["milter"], ["policy"], ["policy", "check"],
                                   ["policy", "test"], ["policy", "explain"], ["ratelimit"],
                                   ["ratelimit", "show"], ["ratelimit", "reset"], ["queue"],
                                   ["queue", "list"], ["queue", "hold"]])
def test_every_command_has_help(words: list[str]) -> None:
    result = mailmoat(*words, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: mailmoat")


def test_queue_commands_on_the_configured_spool(tmp_path: Path) -> None:
    from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
    config = tmp_path / "gw.yaml"
    config.write_text("gateway:\n  queue: {dir: spool}\n")
    queue = Queue(tmp_path / "spool")
    queue_id = queue.enqueue(b"Subject: hi\r\n\r\nbody\r\n",
                             Envelope(new_queue_id(), "a@outside.example",
                                      [RecipientState("taro@example.jp")], 1_795_900_000.0))
    listing = mailmoat("queue", "list", "--config", str(config)).stdout.splitlines()
    assert listing[1].startswith(f"{queue_id}  ") and "<a@outside.example>" in listing[1]
    assert "taro@example.jp (pending)" in listing[2]
    assert mailmoat("queue", "hold", queue_id, "--config", str(config)).returncode == 0
    assert f"{queue_id}!" in mailmoat("queue", "list", "--config", str(config)).stdout
    shown = mailmoat("queue", "show", queue_id, "--config", str(config)).stdout
    assert '"hold_reason": "held by the administrator"' in shown and "Subject: hi" in shown
    assert mailmoat("queue", "release", queue_id, "--config", str(config)).returncode == 0
    assert mailmoat("queue", "delete", queue_id, "--config", str(config)).returncode == 0
    assert mailmoat("queue", "list", "--config", str(config)).stdout == "the queue is empty\n"
    missing = mailmoat("queue", "show", queue_id, "--config", str(config))
    assert missing.returncode == 1 and missing.stderr == f"mailmoat: no queued message {queue_id}\n"


@pytest.mark.parametrize("command", [["serve"], ["scan", "README.md"],
                                     ["milter", "ratelimit", "--listen", "inet:127.0.0.1:1"]])
def test_an_unknown_user_on_the_command_line_is_a_usage_error(command: list[str]) -> None:
    """--user overrides gateway.user; a name that is no user stops before anything starts."""
    result = mailmoat(*command, "--user", "no-such-user-mm")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "mailmoat: --user: no such user 'no-such-user-mm'"


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is root's")
def test_scan_as_root_without_a_user_refuses_before_starting_milters(tmp_path: Path) -> None:
    result = mailmoat("scan", str(ROOT / "README.md"), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert ("scan (the milters it starts) runs as root: set gateway.user" in result.stderr
            and "--user USER" in result.stderr), result.stderr
    assert "milter_started" not in result.stderr
