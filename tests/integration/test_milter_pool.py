"""Milter connections kept between SMTP sessions (QUIT_NC, mta.chain.pool), against real
libmilter milters: our ratelimit milter (pymilter) and OpenDKIM (C).

What must hold: a reused connection is a new client to the milter (its connect data, not the
previous session's); only a connection whose milter is at end of message comes back (in any
other state libmilter ignores QUIT_NC and the CONNECT after it); a milter that went away
while a connection sat idle costs nothing but a fresh connection."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from milters.core.verdict import Action, Verdict
from mta.chain.edits_apply import Transit
from mta.aio.event_loop import new_event_loop
from mta.chain.async_driver import drive
from mta.chain.session import ChainMember, ChainSession, connect_macros
from mta.chain.client import MilterEndpoint
from mta.chain.pool import MilterPool
from tests.harness.milter_proc import MilterProcess
from tests.harness.ports import LOOPBACK

pytestmark = pytest.mark.integration

# One message per client address and hour: a milter that kept the previous session's
# client would count the wrong address, and the verdicts below would say so.
POLICY = """\
ratelimit:
  exempt_internal: false
  limits:
    - {name: per-ip, key: client_ip, per: message, rate: 1/hour, burst: 1}
  reply: "451 4.7.1 Slow down"
"""
MESSAGE = b"From: a@outside.example\r\nSubject: pooled\r\n\r\nhello\r\n"


def run(main: Callable[[], Awaitable[object]]) -> object:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # serve's loop
        return runner.run(main())  # type: ignore[arg-type]


@pytest.fixture
def ratelimit(tmp_path: Path) -> Iterator[MilterProcess]:
    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "milter.yaml"
    config.write_text("store: sqlite:///state.db\npolicy: policy.yaml\n")
    with MilterProcess("ratelimit", config, tmp_path, unix_path=tmp_path / "rl.sock") as milter:
        yield milter


def chain_member(spec: str, name: str = "ratelimit") -> ChainMember:
    return ChainMember(MilterEndpoint(name, spec, connect_timeout=2, command_timeout=10),
                       reuse_connection=True)


async def message_from(chain: ChainSession, client: str, *, send_message: bool = True
                       ) -> list[Verdict]:
    """One SMTP session's milter stages from `client`; the session ends (close) after.
    The milter connection it used is left in `chain.used`."""
    verdicts = [await drive(chain.g_connect(f"[{client}]", client, 40000, socket.AF_INET,
                                            connect_macros("mx.mailmoat.test", client))),
                await drive(chain.g_helo("client.example"))]
    if send_message:
        verdicts.append(await drive(chain.g_mail("a@outside.example", [], {"i": "Q1"})))
        if not verdicts[-1].ends_transaction:
            verdicts.append(await drive(chain.g_rcpt("taro@example.jp", [], {"i": "Q1"})))
            verdict, _ = await drive(chain.g_message(
                Transit(MESSAGE, "a@outside.example", [("taro@example.jp", None)]), {"i": "Q1"}))
            verdicts.append(verdict)
    stream = chain.members[0].client.stream
    assert stream is not None
    chain.used = stream.sock  # type: ignore[attr-defined]
    chain.close()
    return verdicts


def connection_of(chain: ChainSession) -> socket.socket:
    return chain.used  # type: ignore[attr-defined, no-any-return]


def test_a_reused_connection_is_a_new_client_to_the_milter(ratelimit: MilterProcess) -> None:
    pool = MilterPool()
    member = chain_member(ratelimit.socket_spec)
    endpoint = member.endpoint

    async def main() -> None:
        first = ChainSession([member], pool=pool)
        assert [v.action for v in await message_from(first, "192.0.2.1")] == [Action.CONTINUE] * 5
        assert pool.idle_count(endpoint) == 1  # at end of message: kept
        kept = connection_of(first)

        second = ChainSession([member], pool=pool)
        verdicts = await message_from(second, "192.0.2.2")
        assert connection_of(second) is kept  # the same socket, no new negotiation
        # 192.0.2.2's first message: had the milter kept 192.0.2.1, this would be limited.
        assert [v.action for v in verdicts] == [Action.CONTINUE] * 5

        third = ChainSession([member], pool=pool)
        verdicts = await message_from(third, "192.0.2.1")
        assert connection_of(third) is kept
        assert verdicts[-1].action is Action.TEMPFAIL  # 192.0.2.1's second: its limit counts
        assert str(verdicts[-1].reply) == "451 4.7.1 Slow down"
        # Refused at MAIL: libmilter is not at end of message, so QUIT, not QUIT_NC.
        assert pool.idle_count(endpoint) == 0 and kept.fileno() == -1

        fourth = ChainSession([member], pool=pool)
        assert (await message_from(fourth, "192.0.2.3"))[-1].action is Action.CONTINUE
        assert connection_of(fourth) is not kept
        pool.close_all()

    run(main)
    assert "Traceback" not in ratelimit.log_text()


def test_a_session_without_a_message_is_not_kept(ratelimit: MilterProcess) -> None:
    """EHLO and QUIT (or an XCLIENT/STARTTLS reset) leave libmilter after HELO, where it
    would ignore QUIT_NC: the connection is closed and the next session opens its own."""
    pool = MilterPool()
    member = chain_member(ratelimit.socket_spec)

    async def main() -> None:
        idle = ChainSession([member], pool=pool)
        await message_from(idle, "192.0.2.9", send_message=False)
        assert pool.idle_count(member.endpoint) == 0
        # What a wrongly kept connection would break: this client's first message passes,
        # the second is limited (not the other way round, as with 192.0.2.9's data).
        for expected in (Action.CONTINUE, Action.TEMPFAIL):
            verdicts = await message_from(ChainSession([member], pool=pool), "192.0.2.10")
            assert verdicts[-1].action is expected

    run(main)


def test_a_milter_restarted_meanwhile_costs_only_a_fresh_connection(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "milter.yaml"
    config.write_text("store: sqlite:///state.db\npolicy: policy.yaml\n")
    pool = MilterPool()
    first_milter = MilterProcess("ratelimit", config, tmp_path, unix_path=tmp_path / "rl.sock")
    member = chain_member(first_milter.socket_spec)

    async def main() -> None:
        with first_milter:
            kept = ChainSession([member], pool=pool)
            assert (await message_from(kept, "192.0.2.20"))[-1].action is Action.CONTINUE
            assert pool.idle_count(member.endpoint) == 1
        # The milter is gone; the kept connection is dead. A new one starts on the same path
        # (without its stale socket file, as serve's supervisor restarts it).
        (tmp_path / "rl.sock").unlink(missing_ok=True)
        with MilterProcess("ratelimit", config, tmp_path, unix_path=tmp_path / "rl.sock"):
            fresh = ChainSession([member], pool=pool)
            verdicts = await message_from(fresh, "192.0.2.21")
            assert [v.action for v in verdicts] == [Action.CONTINUE] * 5
            assert fresh.results[0].error is None
        pool.close_all()

    run(main)


def test_opendkim_accepting_at_end_of_message_is_never_kept(opendkim: int) -> None:
    """OpenDKIM (C libmilter) answers accept at end of message, which puts libmilter back
    after HELO: with reuse on, its connections are still closed after each session, and each
    message still gets its Authentication-Results header."""
    pool = MilterPool()
    member = chain_member(f"inet:{LOOPBACK}:{opendkim}", name="opendkim")

    async def main() -> None:
        for client in ("192.0.2.30", "192.0.2.31"):
            chain = ChainSession([member], pool=pool)
            await drive(chain.g_connect(f"[{client}]", client, 40000, socket.AF_INET,
                                        connect_macros("mx.mailmoat.test", client)))
            await drive(chain.g_helo("client.example"))
            await drive(chain.g_mail("a@outside.example", [], {"i": "Q2"}))
            await drive(chain.g_rcpt("taro@example.jp", [], {"i": "Q2"}))
            verdict, transit = await drive(chain.g_message(
                Transit(MESSAGE, "a@outside.example", [("taro@example.jp", None)]), {"i": "Q2"}))
            chain.close()
            assert verdict.action is Action.CONTINUE and chain.results[0].verdict == "accept"
            assert transit.raw.startswith(b"Authentication-Results: ")
            assert pool.idle_count(member.endpoint) == 0

    run(main)
