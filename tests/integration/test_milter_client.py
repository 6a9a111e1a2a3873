"""Our MTA's milter client against real milters: a pymilter milter that makes every edit,
our own ratelimit milter, and OpenDKIM (C libmilter) from Debian."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from milters.core.edits import (AddHeader, AddRecipient, ChangeFrom, ChangeHeader,
                                DeleteRecipient, Quarantine, ReplaceBody)
from milters.core.errors import MilterProtocolError
from milters.core.milter_protocol import MacroStage, ProtocolFlag
from milters.core.verdict import Action
from mta.chain.client import MilterClient, MilterEndpoint
from tests.harness.milter_proc import MilterProcess, write_config
from tests.harness.ports import LOOPBACK, free_port

pytestmark = pytest.mark.integration


def client_for(port: int, name: str = "test", **kw: float) -> MilterClient:
    client = MilterClient(MilterEndpoint(name, f"inet:127.0.0.1:{port}", **kw))
    client.open()
    return client


def run_message(client: MilterClient, headers: list[tuple[str, str]], body: bytes,
                rcpts: list[str]):  # type: ignore[no-untyped-def]
    assert client.connect("client.example", "192.0.2.7", 40000).action is Action.CONTINUE
    assert client.helo("client.example").action is Action.CONTINUE
    assert client.mail("sender@outside.example", macros={"i": "QID123"}).action is Action.CONTINUE
    for rcpt in rcpts:
        assert client.rcpt(rcpt).action is Action.CONTINUE
    assert client.data().action is Action.CONTINUE
    for name, value in headers:
        assert client.header(name, value).action is Action.CONTINUE
    assert client.end_of_headers().action is Action.CONTINUE
    assert client.body(body).action is Action.CONTINUE
    return client.end_of_message()


def test_every_end_of_message_action_arrives_in_order(action_milter: int) -> None:
    client = client_for(action_milter)
    body = b"x" * 150_000 + b"\r\n"
    outcome = run_message(client, [("Subject", "original"), ("X-Remove-Me", "bye")], body,
                          ["taro@example.jp", "gone@example.jp"])
    client.close()
    assert outcome.verdict.action is Action.CONTINUE
    assert outcome.edits == [
        AddHeader("X-Added", "appended at the end"),
        AddHeader("X-Inserted", "inserted at the top", 0),
        ChangeHeader("Subject", 1, "changed subject"),
        ChangeHeader("X-Remove-Me", 1, ""),
        AddRecipient("added@example.jp"),
        AddRecipient("added-par@example.jp", "NOTIFY=NEVER"),
        DeleteRecipient("gone@example.jp"),
        ChangeFrom("new-sender@example.jp"),
        AddHeader("X-Seen-Chunks", "65535,65535,18932"),  # 65535-byte chunks, all sent
        AddHeader("X-Seen-Macros", "i=QID123"),
        Quarantine("held for review"),
        ReplaceBody(b"replaced body\r\n"),
    ]


def test_skip_stops_the_body_after_the_first_chunk(action_milter: int) -> None:
    client = client_for(action_milter)
    assert client.negotiated is not None and ProtocolFlag.SKIP in client.negotiated.protocol
    outcome = run_message(client, [("X-Skip-Body", "yes")], b"y" * 200_000,
                          ["taro@example.jp"])
    client.close()
    assert AddHeader("X-Seen-Chunks", "65535") in outcome.edits


def test_reply_codes_of_the_milter_reach_the_mta(action_milter: int) -> None:
    client = client_for(action_milter)
    client.connect("client.example", "192.0.2.7", 40000)
    client.mail("sender@outside.example")
    rejected = client.rcpt("reject-me@example.jp")
    tempfailed = client.rcpt("tempfail-me@example.jp")
    client.close()
    assert rejected.action is Action.REJECT and str(rejected.reply) == "550 5.7.1 No such user here"
    assert tempfailed.action is Action.TEMPFAIL
    assert str(tempfailed.reply) == "451 4.7.1 Try again later"


def test_ratelimit_milter_over_a_unix_socket(tmp_path: Path) -> None:
    policy = ("ratelimit:\n  limits:\n    - {name: m, key: client_ip, per: message, "
              "rate: 1/hour, burst: 1}\n  reply: '451 4.7.1 Slow down'\n"
              "  points: {rejected_recipient: 7}\n")
    config = write_config(tmp_path, policy)
    with MilterProcess("ratelimit", config, tmp_path, unix_path=tmp_path / "rl.sock") as proc:
        client = MilterClient(MilterEndpoint("ratelimit", f"unix:{tmp_path / 'rl.sock'}"))
        answer = client.open()
        assert answer.macros[MacroStage.ENVRCPT] == ["i", "{rcpt_mailer}"]
        # Connect is negotiated without a reply: the client must not wait for one.
        started = time.monotonic()
        assert client.connect("[198.51.100.7]", "198.51.100.7", 5000).action is Action.CONTINUE
        assert time.monotonic() - started < 5  # a waiting client would sit out its 30 s timeout
        assert client.mail("a@outside.example").action is Action.CONTINUE
        # A recipient the MTA rejected, told through {rcpt_mailer}=error (RCPT_REJ).
        client.rcpt("nobody@example.jp", macros={"{rcpt_mailer}": "error", "i": "Q1",
                                                  "{rcpt_host}": "unused"})
        client.abort()
        second = client.mail("a@outside.example")
        client.close()
        assert second.action is Action.TEMPFAIL and str(second.reply) == "451 4.7.1 Slow down"
        proc.wait_for_log(r"event=points .*ip=198.51.100.7 signal=rejected_recipient added=7")


def test_a_milter_that_never_answers_times_out(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
    thread.start()
    client = MilterClient(MilterEndpoint("mute", f"inet:127.0.0.1:{port}",
                                         command_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(MilterProtocolError, match="no reply within 0.5s"):
        client.open()
    assert time.monotonic() - started < 3
    for sock in accepted:
        sock.close()
    server.close()


def test_nothing_listening_is_a_clear_error() -> None:
    client = MilterClient(MilterEndpoint("gone", f"inet:127.0.0.1:{free_port()}"))
    with pytest.raises(MilterProtocolError, match="milter gone at inet:127.0.0.1:.*refused"):
        client.open()


def test_opendkim_c_libmilter_adds_its_authentication_results(opendkim: int) -> None:
    client = client_for(opendkim, "opendkim")
    headers = [("From", "alice@outside.example"), ("To", "taro@example.jp"),
               ("Subject", "unsigned"), ("Date", "Sat, 28 Nov 2026 10:15:00 +0900"),
               ("Message-ID", "<1@outside.example>")]
    outcome = run_message(client, headers, b"hello\r\n", ["taro@example.jp"])
    client.close()
    # OpenDKIM accepts at end of message (no further checks from it for this message).
    assert outcome.verdict.action is Action.ACCEPT
    added = [e for e in outcome.edits if isinstance(e, AddHeader)
             and e.name == "Authentication-Results"]
    assert len(added) == 1, outcome.edits
    # Inserted at the top (insheader index 0), with its leading space (HDR_LEADSPC).
    assert added[0].index == 0
    assert added[0].value.split() == ["mx.mailmoat.test;", "dkim=none;", "dkim-atps=neutral"]
