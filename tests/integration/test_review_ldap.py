"""The review milter against a real slapd (tests/harness/slapd.py): `approvers: [manager]`
resolved from the sender's entry, no manager, a manager without mail, a directory that is down
or hung (451, bounded), a sender address made of LDAP filter metacharacters (escaped, never a
wildcard), and `when: {sender_groups: [...]}` rules (cn and DN), explained by `policy explain`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.config_console import LdapSettings
from milters.core.directory import Directory, DirectoryDown
from milters.core.edits import Quarantine
from milters.core.message import Envelope, Message, Recipient
from milters.core.policy.document import TestMessage, load_policy_text
from milters.core.secrets import SecretSource
from milters.core.verdict import Action
from milters.review.extension import explain_message
from milters.review.logic import ReviewChecker
from mta.cli import EXTENSIONS
from tests.harness.review_standin import Standin
from tests.harness.bounded import bounded
from tests.harness.slapd import PEOPLE, READER_DN, READER_PW, SALES, Slapd
from tests.unit.test_review_logic import Captured, mail

NOW = 1_800_000_000.0
POLICY = """\
internal_networks: [10.0.0.0/8]
own_domains: [example.jp]
review: {language: en}
rules:
  - name: sales-files
    when: {direction: outbound, outside_recipients: true, sender_groups: [SALES_GROUP]}
    then: {review: {delay: 5m}}
  - name: files-to-outside
    when: {direction: outbound, outside_recipients: true, attachments: true}
    then: {review: {approve: {approvers: [APPROVERS], timeout: 8h}}}
"""


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    with Slapd() as server:
        yield server


@pytest.fixture()
def settings(slapd: Slapd, tmp_path: Path) -> LdapSettings:
    secret = tmp_path / "reader.pass"
    secret.write_text(READER_PW + "\n")
    os.chmod(secret, 0o600)
    return LdapSettings(url=slapd.url, timeout=1.0, search_base=PEOPLE, bind_dn=READER_DN,
                        bind_password=SecretSource(file=str(secret)),
                        roles={"admin": ("*",)})


def run(directory: Directory, sender: str, approvers: str = "manager",
        groups: str = "sales"):  # type: ignore[no-untyped-def]
    standin, send = Standin(), Captured()
    kit = dataclasses.replace(standin.kit(), directory=directory)
    checker = ReviewChecker("mx.example.jp", "127.0.0.1:10026", kit, clock=lambda: NOW,
                            send=send)
    env = Envelope(client_ip="10.1.0.5", mail_from=sender, queue_id="Q1",
                   recipients=[Recipient("buyer@customer.example")])
    policy = POLICY.replace("APPROVERS", approvers).replace("SALES_GROUP", groups)
    result = checker.check(Message(raw=mail(), envelope=env),
                           load_policy_text(policy, EXTENSIONS))
    return result, list(standin.book.records.values()), send.sent


def test_the_senders_manager_approves(settings: LdapSettings) -> None:
    result, records, sent = run(Directory(settings), "Bob.Sales@Example.JP",
                                groups="nobody-here")
    assert result.verdict.action is Action.CONTINUE
    assert any(isinstance(e, Quarantine) for e in result.edits)
    (record,) = records
    assert record.kind == "approve" and record.approvers == ("alice@example.jp",)
    assert [r for _, r, _ in sent][0] == ["alice@example.jp"]


def test_no_manager_goes_to_the_next_approver(settings: LdapSettings) -> None:
    # alice has no manager; carol's manager has no mail: the next approver decides.
    for sender in ("alice@example.jp", "carol@example.jp"):
        _, records, _ = run(Directory(settings), sender, "manager, boss@example.jp",
                            groups="nobody-here")
        assert [r.approvers for r in records] == [("boss@example.jp",)], sender


def test_no_manager_and_nobody_else_is_451_not_held(settings: LdapSettings) -> None:
    result, records, sent = run(Directory(settings), "alice@example.jp", groups="nobody-here")
    assert result.verdict.action is Action.TEMPFAIL
    assert not records and not sent


def test_a_sender_unknown_to_the_directory_has_no_manager(settings: LdapSettings) -> None:
    assert Directory(settings).manager_address("nobody@example.jp") is None


@pytest.mark.parametrize("sender", ["b*@example.jp", "*", "bob@example.jp)(mail=*",
                                    "x)(|(mail=bob@example.jp)", "bob@example.jp\\2a"])
def test_filter_metacharacters_in_the_sender_match_nobody(settings: LdapSettings,
                                                         sender: str) -> None:
    """Unescaped, b*@example.jp would find bob and make alice his approver."""
    directory = Directory(settings)
    assert directory.manager_address(sender) is None
    assert directory.sender_groups(sender) == frozenset()


def test_directory_down_is_451(settings: LdapSettings) -> None:
    down = dataclasses.replace(settings, url="ldap://127.0.0.1:1")
    with pytest.raises(DirectoryDown):
        Directory(down).manager_address("bob@example.jp")
    result, records, sent = run(Directory(down), "bob@example.jp", groups="nobody-here")
    assert result.verdict.action is Action.TEMPFAIL and not records and not sent


def test_a_wrong_reader_password_is_directory_down_not_no_manager(
        settings: LdapSettings, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("not-it\n")
    os.chmod(wrong, 0o600)
    bad = dataclasses.replace(settings, bind_password=SecretSource(file=str(wrong)))
    with pytest.raises(DirectoryDown):
        Directory(bad).manager_address("bob@example.jp")


def test_a_hung_directory_is_451_within_the_timeout(slapd: Slapd,
                                                    settings: LdapSettings) -> None:
    slapd.pause()
    try:
        outcome = bounded(lambda: run(Directory(settings), "bob@example.jp",
                                      groups="nobody-here"), what="a hung directory's lookup")
    finally:
        slapd.resume()
    assert not isinstance(outcome, BaseException), outcome
    result, records, _ = outcome
    assert result.verdict.action is Action.TEMPFAIL and not records


@pytest.mark.parametrize("group", ["sales", "SALES", f'"{SALES}"',
                                   '"' + SALES.upper().replace(",", ", ") + '"'])
def test_a_group_rule_holds_the_members_mail(settings: LdapSettings, group: str) -> None:
    _, records, _ = run(Directory(settings), "bob@example.jp", "boss@example.jp", group)
    assert [r.kind for r in records] == ["delay"]  # sales-files decided
    _, records, _ = run(Directory(settings), "alice@example.jp", "boss@example.jp", group)
    assert [r.kind for r in records] == ["approve"]  # not in sales: the next rule


def test_a_group_rule_with_the_directory_down_is_451(settings: LdapSettings) -> None:
    down = dataclasses.replace(settings, url="ldap://127.0.0.1:1")
    result, records, _ = run(Directory(down), "bob@example.jp", "boss@example.jp")
    assert result.verdict.action is Action.TEMPFAIL and not records


def test_policy_explain_says_groups_need_ldap() -> None:
    policy = load_policy_text(POLICY.replace("APPROVERS", "manager")
                              .replace("SALES_GROUP", "sales"), EXTENSIONS)
    lines = explain_message(policy, TestMessage(client_ip="10.1.0.5",
                                                mail_from="bob@example.jp",
                                                rcpt=("buyer@customer.example",),
                                                attachments=("a.pdf",)))
    text = "\n".join(lines)
    assert "needs LDAP" in text and "files-to-outside" in text
    assert "approve by manager" in text


@pytest.mark.parametrize("group,problem", [
    ('"cn=sales,,dc=jp"', "not a valid DN"),
    ('"sales\\u0007x"', "one line of text"),
    ('"sales, legal"', "a cn has no comma"),
])
def test_a_bad_group_is_refused_at_its_place(group: str, problem: str) -> None:
    from milters.core.errors import ConfigError
    text = POLICY.replace("APPROVERS", "manager").replace("SALES_GROUP", group)
    with pytest.raises(ConfigError) as caught:
        load_policy_text(text, EXTENSIONS)
    assert "rules[0].when.sender_groups[0]" in str(caught.value)
    assert problem in str(caught.value)
