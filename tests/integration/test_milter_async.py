"""The event-loop driver of the milter client (mta.chain.async_driver), which `serve` uses: the same
protocol steps as the blocking driver, resumed from socket callbacks. Against a real milter
(every edit, a body bigger than the socket buffers) and scripted ones for what real milters
rarely do on cue: progress packets, silence, reading slowly, hanging up."""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from milters.core.edits import AddHeader, ReplaceBody
from milters.core.errors import MilterProtocolError
from milters.core.milter_protocol import ALL_ACTIONS, OptNeg, ProtocolFlag, encode_packet
from milters.core.verdict import Action
from mta.chain.edits_apply import Transit
from mta.chain.async_driver import HIGH_WATER, drive
from mta.chain.session import ChainMember, ChainSession
from mta.chain.client import MilterClient, MilterEndpoint
from tests.harness.ports import LOOPBACK, free_port

pytestmark = pytest.mark.integration


def run(coroutine_factory: Callable[[], object]) -> object:
    return asyncio.run(coroutine_factory())  # type: ignore[arg-type]


async def opened(client: MilterClient) -> None:
    await drive(client.g_open())


async def session(client: MilterClient, body: bytes = b"hello\r\n") -> object:
    """A whole message through one milter, every stage driven on the loop."""
    await drive(client.g_open())
    for steps in (client.g_connect("c.example", "192.0.2.7", 4000), client.g_helo("c.example"),
                  client.g_mail("a@outside.example", [], {"i": "Q1"}),
                  client.g_rcpt("taro@example.jp"), client.g_data(),
                  client.g_header("Subject", "hi"), client.g_end_of_headers(),
                  client.g_body(body)):
        verdict = await drive(steps)
        assert verdict.action is Action.CONTINUE, verdict
    return await drive(client.g_end_of_message())


def test_a_real_milter_gets_a_big_body_and_every_edit_comes_back(action_milter: int) -> None:
    body = b"".join(b"line %06d of a body bigger than any socket buffer\r\n" % i
                    for i in range(60_000))
    assert len(body) > 40 * HIGH_WATER
    client = MilterClient(MilterEndpoint("actions", f"inet:{LOOPBACK}:{action_milter}"))
    outcome = run(lambda: session(client, body))
    client.close()
    assert outcome.verdict.action is Action.CONTINUE  # type: ignore[attr-defined]
    edits = outcome.edits  # type: ignore[attr-defined]
    assert AddHeader("X-Added", "appended at the end") in edits
    assert any(isinstance(edit, ReplaceBody) for edit in edits)


# -- scripted milters -------------------------------------------------------------------------
def read_packet(conn: socket.socket) -> tuple[bytes, bytes]:
    head = b""
    while len(head) < 4:
        chunk = conn.recv(4 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    (length,) = struct.unpack("!I", head)
    data = b""
    while len(data) < length:
        chunk = conn.recv(length - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data[:1], data[1:]


def negotiate(conn: socket.socket, protocol: ProtocolFlag = ProtocolFlag(0)) -> None:
    command, _ = read_packet(conn)
    assert command == b"O"
    conn.sendall(encode_packet(b"O", OptNeg(6, ALL_ACTIONS, protocol).encode()))


@contextmanager
def scripted_milter(script: Callable[[socket.socket], None], *,
                    unix_dir: Path | None = None) -> Iterator[str]:
    """A milter that runs `script` on its one connection; yields its socket spec."""
    if unix_dir is not None:
        path = unix_dir / "scripted.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        spec = f"unix:{path}"
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((LOOPBACK, 0))
        spec = f"inet:{LOOPBACK}:{listener.getsockname()[1]}"
    listener.listen(4)
    problems: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            script(conn)
        except (EOFError, OSError):
            pass  # the client hung up: the scripts end there
        except BaseException as exc:  # an assertion in the script: fail the test
            problems.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield spec
    finally:
        thread.join(10)
        listener.close()
        assert not problems, problems


def reply_mail_after(progress: int, every: float) -> Callable[[socket.socket], None]:
    """Negotiate (connect and HELO without replies), then answer MAIL after `progress`
    progress packets, `every` seconds apart."""
    def script(conn: socket.socket) -> None:
        negotiate(conn, ProtocolFlag.NR_CONN | ProtocolFlag.NR_HELO)
        while True:
            command, _ = read_packet(conn)
            if command == b"M":
                break
        for _ in range(progress):
            time.sleep(every)
            conn.sendall(encode_packet(b"p"))
        time.sleep(every)
        conn.sendall(encode_packet(b"c"))
        read_packet(conn)  # until the client hangs up
    return script


async def mail_from(client: MilterClient) -> Action:
    await drive(client.g_open())
    await drive(client.g_connect("c.example", "192.0.2.7", 4000))
    await drive(client.g_helo("c.example"))
    return (await drive(client.g_mail("a@outside.example", [], {"i": "Q1"}))).action


def test_progress_packets_keep_a_slow_milter_within_its_timeout(tmp_path: Path) -> None:
    # 1.2 s in all, never 0.4 s without a packet: the 0.4 s timeout restarts on each one.
    with scripted_milter(reply_mail_after(progress=3, every=0.3), unix_dir=tmp_path) as spec:
        client = MilterClient(MilterEndpoint("slow", spec, command_timeout=0.4))
        started = time.monotonic()
        assert run(lambda: mail_from(client)) is Action.CONTINUE
        assert time.monotonic() - started >= 1.2
        client.close()


def test_silence_past_the_timeout_is_a_failure_named_after_the_wait(tmp_path: Path) -> None:
    with scripted_milter(reply_mail_after(progress=1, every=0.6), unix_dir=tmp_path) as spec:
        client = MilterClient(MilterEndpoint("mute", spec, command_timeout=0.4))
        started = time.monotonic()
        with pytest.raises(MilterProtocolError, match="milter mute: no reply within 0.4s"):
            run(lambda: mail_from(client))
        assert time.monotonic() - started < 1.0
        client.close()


def test_a_milter_that_hangs_up_mid_stage_is_a_failure(tmp_path: Path) -> None:
    def hang_up_at_mail(conn: socket.socket) -> None:
        negotiate(conn, ProtocolFlag.NR_CONN | ProtocolFlag.NR_HELO)
        while read_packet(conn)[0] != b"M":
            pass
    with scripted_milter(hang_up_at_mail, unix_dir=tmp_path) as spec:
        client = MilterClient(MilterEndpoint("gone", spec))
        with pytest.raises(MilterProtocolError, match="milter gone: the milter closed"):
            run(lambda: mail_from(client))
        client.close()


def test_a_slow_reader_gets_the_whole_body_in_order(tmp_path: Path) -> None:
    body = bytes(range(256)) * 4096 + b"\r\n"  # 1 MiB: far more than the socket buffers
    received = bytearray()

    def slow_reader(conn: socket.socket) -> None:
        negotiate(conn, ProtocolFlag.NR_CONN | ProtocolFlag.NR_HELO | ProtocolFlag.NR_MAIL
                  | ProtocolFlag.NR_RCPT | ProtocolFlag.NR_DATA | ProtocolFlag.NR_HDR
                  | ProtocolFlag.NR_EOH | ProtocolFlag.NR_BODY)
        time.sleep(0.5)  # the client must wait for room, not buffer the whole body
        while True:
            command, data = read_packet(conn)
            if command == b"B":
                received.extend(data)
            elif command == b"E":
                conn.sendall(encode_packet(b"c"))
                return

    async def body_only(client: MilterClient) -> object:
        outcome = await session(client, body)
        assert client.stream is not None and len(client.stream.backlog) == 0
        return outcome

    with scripted_milter(slow_reader, unix_dir=tmp_path) as spec:
        client = MilterClient(MilterEndpoint("slow-reader", spec, command_timeout=5))
        outcome = run(lambda: body_only(client))
        client.close()
    assert outcome.verdict.action is Action.CONTINUE  # type: ignore[attr-defined]
    assert bytes(received) == body


@pytest.mark.parametrize("where", ["unix", "inet"])
def test_nothing_listening_is_a_clear_error(tmp_path: Path, where: str) -> None:
    spec = (f"unix:{tmp_path / 'nobody.sock'}" if where == "unix"
            else f"inet:{LOOPBACK}:{free_port()}")
    client = MilterClient(MilterEndpoint("gone", spec, connect_timeout=2))
    reason = "No such file or directory" if where == "unix" else "refused"
    with pytest.raises(MilterProtocolError, match=f"milter gone at .*: open: .*{reason}"):
        run(lambda: opened(client))
    assert client.stream is None and client.sock is None


def test_a_connect_that_never_completes_times_out() -> None:
    # 192.0.2.1 (TEST-NET-1) is not routed anywhere: the SYN goes unanswered, or the
    # network is unreachable at once; either way a failure, never a hang.
    client = MilterClient(MilterEndpoint("far", "inet:192.0.2.1:8891", connect_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(MilterProtocolError, match=r"milter far.*open"):
        run(lambda: opened(client))
    assert time.monotonic() - started < 2


def test_a_chain_cancelled_mid_stage_stops_quietly(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The SMTP client went away while a milter was thinking: the stage's future is
    cancelled, the chain closed, and no milter failure is logged for it."""
    with scripted_milter(reply_mail_after(progress=0, every=0.5), unix_dir=tmp_path) as spec:
        chain = ChainSession([ChainMember(MilterEndpoint("thinking", spec))])

        async def cancel_mid_stage() -> None:
            await drive(chain.g_connect("c.example", "192.0.2.7", 4000))
            stage = drive(chain.g_mail("a@outside.example", [], {"i": "Q1"}))
            await asyncio.sleep(0.1)
            assert not stage.done()
            stage.cancel()
            chain.close()
            await asyncio.sleep(0.6)  # past the milter's answer: nothing may wake up

        run(cancel_mid_stage)
    assert "milter_failed" not in caplog.text
    assert all(member.client.stream is None for member in chain.members)


def test_serve_reads_a_chain_stage_for_each_milter_in_turn(action_milter: int,
                                                           second_action_milter: int) -> None:
    """Two milters on one chain: each stage goes to both, and the edits of the first are
    applied before the second sees the message (as with the blocking driver)."""
    chain = ChainSession([
        ChainMember(MilterEndpoint("one", f"inet:{LOOPBACK}:{action_milter}")),
        ChainMember(MilterEndpoint("two", f"inet:{LOOPBACK}:{second_action_milter}"))])

    async def whole() -> tuple[object, Transit]:
        for steps in (chain.g_connect("c.example", "192.0.2.7", 4000),
                      chain.g_helo("c.example"),
                      chain.g_mail("a@outside.example", [], {"i": "Q1"}),
                      chain.g_rcpt("taro@example.jp")):
            assert (await drive(steps)).action is Action.CONTINUE
        return await drive(chain.g_message(Transit(
            b"Subject: original\r\n\r\nbody\r\n", "a@outside.example",
            [("taro@example.jp", None)]), {"i": "Q1"}))

    verdict, transit = run(whole)  # type: ignore[misc]
    chain.close()
    assert verdict.action is Action.CONTINUE  # type: ignore[attr-defined]
    assert transit.raw.count(b"X-Added: appended at the end") == 2


def test_a_full_unix_backlog_is_retried_until_the_milter_accepts(tmp_path: Path) -> None:
    """A unix socket whose listen queue is full refuses at once (EAGAIN), with no connect
    in progress: the client tries again until its connect timeout."""
    path = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(str(path))  # takes the one place in the queue
    accepted: list[socket.socket] = []

    def accept_later() -> None:
        time.sleep(0.3)
        for _ in range(2):
            conn, _ = listener.accept()
            accepted.append(conn)
            if len(accepted) == 2:
                negotiate(conn)

    thread = threading.Thread(target=accept_later, daemon=True)
    thread.start()
    client = MilterClient(MilterEndpoint("busy", f"unix:{path}", connect_timeout=3))
    started = time.monotonic()
    run(lambda: opened(client))
    assert time.monotonic() - started >= 0.25
    assert client.negotiated is not None
    client.close()
    thread.join(5)

    timed_out = MilterClient(MilterEndpoint("busy", f"unix:{path}", connect_timeout=0.3))
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.connect(str(path))  # the queue is full again, and nobody accepts any more
    with pytest.raises(MilterProtocolError, match="milter busy: open not done within 0.3s"):
        run(lambda: opened(timed_out))
    assert timed_out.stream is None
    for sock in [filler, other, listener, *accepted]:
        sock.close()
