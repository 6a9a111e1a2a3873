"""What one hostile client can hold, tried over the real SMTP port: memory with replies it
never reads, a slot by trickling a command or DATA a byte at a time (also under connection
pressure), and the error limit with over-long command lines whose tails must never run."""
from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from mta.queue.spool import Queue
from tests.harness.ports import LOOPBACK
from tests.integration.test_serve import Serve
from tests.integration.test_smtpd_protocol import HOSTNAME, Client, greeted, server

pytestmark = pytest.mark.integration

TIMEOUT_REPLY = f"421 4.4.2 {HOSTNAME} Error: timeout exceeded"
TOO_LONG = "500 5.5.2 Error: line too long"


# -- flow control --------------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def flood_without_reading(port: int, total: int, stall: float, limit: float) -> int:
    """Send `total` bytes of pipelined NOOPs and never read a reply; stop early when the
    server has taken nothing for `stall` seconds (it stopped reading us). Bytes sent."""
    chunk = b"NOOP\r\n" * 10000
    sent = 0
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.recv(4096)  # the banner
        sock.sendall(b"EHLO flood.example\r\n")
        sock.setblocking(False)
        started = time.monotonic()
        while sent < total and time.monotonic() - started < limit:
            _, writable, _ = select.select([], [sock], [], stall)
            if not writable:
                break  # the server stopped reading: what flow control is for
            try:
                sent += sock.send(chunk[:total - sent])
            except BlockingIOError:
                continue
        time.sleep(1.0)  # let serve work through what it has taken
    return sent


def test_a_client_that_never_reads_its_replies_cannot_grow_serves_memory(
        tmp_path: Path) -> None:
    """20 MB of pipelined NOOPs would be 47 MB of replies; serve's RSS may grow by a few
    MB at most, and the session is dropped at its deadline, not kept."""
    serve = Serve(tmp_path).start()
    try:
        pid = serve.proc.pid  # type: ignore[union-attr]
        with greeted(serve.port) as warm:  # one ordinary session first: a warm server
            warm.send(b"EHLO warm.example\r\nNOOP\r\nQUIT\r\n")
            warm.reply()
            warm.replies(2)
        before = rss_kib(pid)
        sent = flood_without_reading(serve.port, 20 << 20, stall=2.0, limit=60.0)
        peak = max(rss_kib(pid) for _ in range(5) if time.sleep(0.2) is None)
        grew = (peak - before) / 1024
        print(f"flood: sent {sent / 2**20:.1f} MiB, serve RSS {before / 1024:.1f} -> "
              f"{peak / 1024:.1f} MiB (+{grew:.1f} MiB)")
        assert grew < 8, f"serve's RSS grew by {grew:.1f} MiB under the flood"
        # Meanwhile everyone else is served as usual.
        with greeted(serve.port) as other:
            other.send(b"EHLO other.example\r\nNOOP\r\n")
            other.reply()
            assert other.last() == "250 2.0.0 Ok"
    finally:
        serve.stop()


def test_replies_still_come_once_a_paused_client_reads(tmp_path: Path) -> None:
    """Flow control only waits: every pipelined command is answered, in order."""
    count = 200_000  # 2.8 MB of replies: more than the socket buffers hold
    with server(tmp_path / "spool") as (port, _):
        with greeted(port) as client:
            client.sock.settimeout(10)
            client.send(b"EHLO c.example\r\n")
            client.reply()
            sender = threading.Thread(target=client.sock.sendall,
                                      args=(b"NOOP\r\n" * count + b"QUIT\r\n",), daemon=True)
            sender.start()
            time.sleep(1.0)  # the server stops reading while we do not read
            answered = 0
            while True:
                line = client.last()
                if line != "250 2.0.0 Ok":
                    break
                answered += 1
            assert (answered, line) == (count, "221 2.0.0 Bye")
            sender.join(10)


# -- slow clients --------------------------------------------------------------------------------
def trickle(client: Client, data: bytes, interval: float, limit: float) -> str:
    """Send `data` one byte per `interval` (starting over when it runs out) until the
    server says something, for at most `limit` seconds; what it said while we were still
    trickling, or "(no reply)": a server that only cuts idle clients never answers here."""
    client.sock.settimeout(interval)
    started = time.monotonic()
    index = 0
    while time.monotonic() - started < limit:
        try:
            client.send(data[index % len(data):index % len(data) + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
        index += 1
        try:
            chunk = client.sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        client.pending += chunk
        break
    if not client.pending:
        return "(no reply)"
    client.sock.settimeout(5)  # the rest of a reply that began
    return client.last()


def test_a_command_trickled_one_byte_at_a_time_is_cut_at_its_deadline(
        tmp_path: Path) -> None:
    """Bytes keep coming, so no idle timeout would ever fire: the deadline does."""
    with server(tmp_path / "spool", timeout=1.0) as (port, _):
        with greeted(port) as client:
            client.send(b"EHLO c.example\r\n")
            client.reply()
            # The limit is 1 s; the trickle stops after 5 s (generous for a loaded machine),
            # so a server that waits longer gives no reply here.
            said = trickle(client, b"NOOP " + b"x" * 400, interval=0.05, limit=5)
            assert said == TIMEOUT_REPLY, said
            assert client.closed_by_server()


def test_data_trickled_one_byte_at_a_time_is_cut_at_its_deadline(tmp_path: Path) -> None:
    """1 s plus one second per 500 bytes (Postfix's smtpd_min_data_rate): at 20 bytes a
    second the client never catches up with its deadline."""
    with server(tmp_path / "spool", timeout=1.0, min_data_rate=500) as (port, queue):
        with greeted(port) as client:
            client.send(b"EHLO c.example\r\nMAIL FROM:<a@example.jp>\r\n"
                        b"RCPT TO:<t@example.jp>\r\nDATA\r\n")
            client.reply()
            assert client.replies(3)[-1].startswith("354 ")
            said = trickle(client, b"Subject: slow\r\n\r\nbody line\r\n",
                              interval=0.05, limit=5)
            assert said == TIMEOUT_REPLY, said
            assert client.closed_by_server()
        assert queue.entries() == []


def test_a_fast_big_message_is_not_cut_by_the_data_deadline(tmp_path: Path) -> None:
    """The deadline grows with the bytes received: a client that sends quickly has time."""
    with server(tmp_path / "spool", timeout=1.0, min_data_rate=500,
                max_message_size=8 << 20) as (port, queue):
        with greeted(port) as client:
            client.send(b"EHLO c.example\r\nMAIL FROM:<a@example.jp>\r\n"
                        b"RCPT TO:<t@example.jp>\r\nDATA\r\n")
            client.reply()
            assert client.replies(3)[-1].startswith("354 ")
            line = b"y" * 998 + b"\r\n"
            for _ in range(15):  # 1.5 s in all, 15 KB: well above 500 bytes a second
                client.send(b"Subject: steady\r\n\r\n" if _ == 0 else line * 1)
                time.sleep(0.1)
            client.send(b".\r\n")
            assert client.last().startswith("250 2.0.0 Ok: queued as ")
        assert len(queue.entries()) == 1


@pytest.fixture
def pressure(tmp_path: Path) -> Iterator[tuple[int, Queue]]:
    """max_connections 10, stress from 5 on; 30 s normally, 1 s under stress."""
    with server(tmp_path / "spool", timeout=30.0, stress_timeout=1.0, max_connections=10,
                max_connections_per_ip=10, stress_share=0.5) as running:
        yield running


@pytest.mark.parametrize("pressure_first", [True, False], ids=["pressure-first",
                                                             "trickler-first"])
def test_under_connection_pressure_a_trickler_is_cut_at_the_stress_timeout(
        pressure: tuple[int, Queue], pressure_first: bool) -> None:
    """Whether the pressure was there when the trickler came or came while it trickled
    (then its 30 s wait must shrink too)."""
    port, _ = pressure
    stop = threading.Event()
    ready = threading.Barrier(6, timeout=10)

    def keep_busy() -> None:  # an honest, busy client: keeps the pressure on
        if not pressure_first:
            stop.wait(1.0)  # the trickler is well under way by then
        with greeted(port) as client:
            ready.wait() if pressure_first else None
            for _ in range(200):  # bounded: 200 NOOPs, 0.2 s apart
                client.send(b"NOOP\r\n")
                assert client.last() == "250 2.0.0 Ok"
                if stop.wait(0.2):
                    return

    threads = [threading.Thread(target=keep_busy, daemon=True) for _ in range(5)]
    for thread in threads:
        thread.start()
    try:
        if pressure_first:
            ready.wait()
        with greeted(port) as client:
            # 30 s without pressure, 1 s with it: the trickle stops after 10 s.
            said = trickle(client, b"NOOP " + b"x" * 400, interval=0.05, limit=10)
            assert said == TIMEOUT_REPLY, said
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def test_without_pressure_the_normal_timeout_applies(pressure: tuple[int, Queue]) -> None:
    """The other side of the test above: one trickler alone is not under stress."""
    port, _ = pressure
    with greeted(port) as client:
        client.sock.settimeout(0.05)
        for _ in range(40):  # 2 s of trickling: twice the stress timeout
            client.send(b"x")
            with pytest.raises(TimeoutError):
                client.sock.recv(4096)
        client.sock.settimeout(5)
        client.send(b"\r\n")
        assert client.last() == "502 5.5.2 Error: command not recognized"


# -- over-long command lines ---------------------------------------------------------------------
TAILS = [b"QUIT", b"RSET", b"MAIL FROM:<x@evil.example>", b"RCPT TO:<victim@elsewhere.example>"]


def session_in_a_transaction(port: int) -> Client:
    client = greeted(port)
    client.send(b"EHLO c.example\r\nMAIL FROM:<a@example.jp>\r\n")
    client.reply()
    assert client.last() == "250 2.1.0 Ok"
    return client


def state_is_untouched(client: Client) -> None:
    """The session goes on, its transaction as it was: no QUIT, RSET or MAIL ran."""
    client.send(b"MAIL FROM:<b@example.jp>\r\nRCPT TO:<t@example.jp>\r\n")
    assert client.replies(2) == ["503 5.5.1 Error: nested MAIL command", "250 2.1.5 Ok"]


@pytest.mark.parametrize("tail", TAILS, ids=lambda t: t.split()[0].decode())
@pytest.mark.parametrize("head", [600, 5000], ids=["600B", "5000B"])
def test_the_tail_of_an_over_long_line_never_runs_as_a_command(
        gateway_plain: tuple[int, Queue], tail: bytes, head: int) -> None:
    """The tail comes in a packet of its own, after the server has seen more than the
    limit without a line end: the old code answered and then took the tail for a
    command of its own."""
    port, _ = gateway_plain
    with session_in_a_transaction(port) as client:
        client.send(b"NOOP " + b"x" * (head - 5))
        time.sleep(0.3)  # the server reads the head alone
        client.send(tail + b"\r\n")
        assert client.last() == TOO_LONG
        state_is_untouched(client)


@pytest.mark.parametrize("tail", TAILS, ids=lambda t: t.split()[0].decode())
def test_an_over_long_line_in_one_write_is_refused_whole(
        gateway_plain: tuple[int, Queue], tail: bytes) -> None:
    port, _ = gateway_plain
    with session_in_a_transaction(port) as client:
        line = b"NOOP " + b"x" * (512 - 5 - 2) + tail  # byte 513 on is the tail
        assert len(line) > 510
        client.send(line + b"\r\nNOOP\r\n")
        assert client.replies(2) == [TOO_LONG, "250 2.0.0 Ok"]
        state_is_untouched(client)


def test_a_line_of_exactly_512_octets_is_a_command(gateway_plain: tuple[int, Queue]) -> None:
    port, _ = gateway_plain
    with greeted(port) as client:
        client.send(b"NOOP " + b"x" * (512 - 5 - 2) + b"\r\n")
        assert client.last() == "250 2.0.0 Ok"


def test_mail_and_auth_lines_get_what_their_extensions_allow(
        gateway_plain: tuple[int, Queue]) -> None:
    """RFC 4954: AUTH= adds 500 octets to MAIL, AUTH lines may reach 12288."""
    port, _ = gateway_plain
    with greeted(port) as client:
        client.send(b"EHLO c.example\r\nMAIL FROM:<a@example.jp> AUTH=<" + b"u" * 490
                    + b"@example.jp> SIZE=100\r\nAUTH PLAIN " + b"A" * 4000 + b"\r\n")
        client.reply()
        assert client.last() == "250 2.1.0 Ok"
        assert client.last() != TOO_LONG


def test_over_long_lines_count_toward_the_error_limit(gateway_plain: tuple[int, Queue]) -> None:
    port, _ = gateway_plain
    long_line = b"NOOP " + b"x" * 600 + b"\r\n"
    with greeted(port) as client:
        client.send(long_line * 19 + b"NOOP\r\n")
        assert client.replies(19) == [TOO_LONG] * 19
        assert client.last() == "250 2.0.0 Ok"
        client.send(long_line + b"NOOP\r\n")
        assert client.last() == f"421 4.7.0 {HOSTNAME} Error: too many errors"
        assert client.closed_by_server()


def test_a_line_that_never_ends_is_dropped_as_it_comes_and_cut_at_the_deadline(
        tmp_path: Path) -> None:
    """Megabytes without a line end: nothing kept, and the deadline still applies."""
    with server(tmp_path / "spool", timeout=1.0) as (port, _):
        with greeted(port) as client:
            started = time.monotonic()
            said = None
            client.sock.settimeout(0.1)
            while time.monotonic() - started < 8 and said is None:  # the bound
                try:
                    client.send(b"x" * 65536)
                except (BrokenPipeError, ConnectionResetError):
                    break
                try:
                    client.pending += client.sock.recv(4096)
                    said = True
                except TimeoutError:
                    pass
            assert client.pending, "no reply while the line was still coming in"
            client.sock.settimeout(5)  # the rest of a reply that began
            assert client.last() == TIMEOUT_REPLY


@pytest.fixture
def gateway_plain(tmp_path: Path) -> Iterator[tuple[int, Queue]]:
    with server(tmp_path / "spool") as running:
        yield running
