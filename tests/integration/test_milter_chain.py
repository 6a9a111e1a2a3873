"""The milter chain: real milters in order, each seeing the message as the earlier ones left
it; the first refusal wins; on_failure decides what a dead milter means."""
from __future__ import annotations

from pathlib import Path

import pytest

from milters.core.verdict import Action
from mta.chain.edits_apply import Transit, split_message
from mta.chain.session import ChainMember, ChainSession
from mta.chain.client import MilterEndpoint
from tests.harness.ports import free_port

pytestmark = pytest.mark.integration

MESSAGE = (b"From: alice@outside.example\r\nTo: taro@example.jp\r\nSubject: original\r\n"
           b"Date: Sat, 28 Nov 2026 10:15:00 +0900\r\nMessage-ID: <2@outside.example>\r\n"
           b"X-Remove-Me: bye\r\n\r\n" + b"z" * 70_000 + b"\r\n")


def member(name: str, port: int, on_failure: str = "tempfail") -> ChainMember:
    return ChainMember(MilterEndpoint(name, f"inet:127.0.0.1:{port}", connect_timeout=2),
                       on_failure)


def run(chain: ChainSession, rcpts: list[str]) -> tuple[list, object]:  # type: ignore[type-arg]
    verdicts = [chain.connect("client.example", "192.0.2.7", 40000),
                chain.helo("client.example"), chain.mail("alice@outside.example")]
    verdicts += [chain.rcpt(r) for r in rcpts]
    if all(not v.ends_transaction for v in verdicts):
        verdict, transit = chain.message(Transit(MESSAGE, "alice@outside.example",
                                                 [(r, None) for r in rcpts]))
        verdicts.append(verdict)
        return verdicts, transit
    return verdicts, None


def test_each_milter_sees_what_the_earlier_ones_left(action_milter: int,
                                                    second_action_milter: int,
                                                    opendkim: int) -> None:
    chain = ChainSession([member("first", action_milter), member("second", second_action_milter),
                          member("opendkim", opendkim)])
    verdicts, transit = run(chain, ["taro@example.jp", "gone@example.jp"])
    chain.close()
    assert verdicts[-1].action is Action.CONTINUE
    fields, body = split_message(transit.raw)  # type: ignore[attr-defined]
    text = [f.decode() for f in fields]
    # The first milter saw the original 70,002-byte body in two chunks; the second saw the
    # body the first one left (15 bytes).
    assert "X-Seen-Chunks: 65535,4467\r\n" in text
    assert "X-Seen-Chunks: 15\r\n" in text
    assert text[0].startswith("Authentication-Results: mx.mailmoat.test;")  # OpenDKIM, on top
    assert text.count("Subject: changed subject\r\n") == 1
    assert not any(f.startswith("X-Remove-Me") for f in text)
    assert body == b"replaced body\r\n"
    assert transit.sender == "new-sender@example.jp"  # type: ignore[attr-defined]
    assert [r for r, _ in transit.recipients] == [  # type: ignore[attr-defined]
        "taro@example.jp", "added@example.jp", "added-par@example.jp"]
    assert transit.quarantine == "held for review"  # type: ignore[attr-defined]
    results = {r.name: r for r in chain.results}
    assert results["opendkim"].verdict == "accept" and len(results["first"].actions) == 12


def test_first_refusal_wins_and_later_milters_are_not_asked(action_milter: int,
                                                            second_action_milter: int) -> None:
    chain = ChainSession([member("first", action_milter), member("second", second_action_milter)])
    verdicts, _ = run(chain, ["reject-me@example.jp"])
    chain.close()
    assert verdicts[-1].action is Action.REJECT
    assert str(verdicts[-1].reply) == "550 5.7.1 No such user here"
    assert [r.stage for r in chain.results] == ["rcpt", None]


@pytest.mark.parametrize("on_failure, expected", [("tempfail", Action.TEMPFAIL),
                                                  ("reject", Action.REJECT),
                                                  ("accept", Action.CONTINUE)])
def test_a_dead_milter_gets_its_on_failure(action_milter: int, on_failure: str,
                                           expected: Action, tmp_path: Path) -> None:
    chain = ChainSession([member("dead", free_port(), on_failure), member("alive", action_milter)])
    verdicts, transit = run(chain, ["taro@example.jp"])
    chain.close()
    assert verdicts[0].action is expected
    if expected is Action.CONTINUE:  # the live milter still did its work
        assert transit is not None and b"X-Added: appended at the end" in transit.raw  # type: ignore[attr-defined]
    dead = chain.results[0]
    assert dead.error is not None and "refused" in dead.error
