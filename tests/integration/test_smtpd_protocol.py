"""The SMTP server's protocol, as a mail admin would check it against a real listener on
loopback: pipelining, command order, bare LF, STARTTLS injection, error and idle limits,
SMTP AUTH, and what happens when a milter is down or hangs."""
from __future__ import annotations

import base64
import re
import select
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.policy.matching import parse_network_pattern
from mta.gateway.listener import ThreadedListener
from mta.chain.session import ChainMember, ChainSession
from mta.chain.client import MilterEndpoint
from mta.queue.spool import Queue
from mta.smtp_in.server import GatewayHandler, SmtpSettings, server_tls_context
from mta.smtp_in.users import UserFile, set_password
from tests.harness.ports import LOOPBACK, free_port
from tests.harness.swaks import run_swaks

pytestmark = pytest.mark.integration

LOOPBACK_NET = (parse_network_pattern("127.0.0.0/8"),)
HOSTNAME = "mx.mailmoat.test"
PASSWORD = "s3cret pass"


def settings(**kw: object) -> SmtpSettings:
    base = dict(hostname=HOSTNAME, internal_networks=LOOPBACK_NET,
                relay_domains=("example.jp",), xclient_networks=LOOPBACK_NET,
                max_message_size=200_000, max_recipients=3)
    base.update(kw)
    return SmtpSettings(**base)  # type: ignore[arg-type]


@contextmanager
def server(spool: Path, chain_factory=None, **kw: object  # type: ignore[no-untyped-def]
           ) -> Iterator[tuple[int, Queue]]:
    queue = Queue(spool)
    port = free_port()
    with ThreadedListener(GatewayHandler(settings(**kw), queue, chain_factory), LOOPBACK, port):
        yield port, queue


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[int, Queue]]:
    with server(tmp_path / "spool") as running:
        yield running


class Client:
    """A raw SMTP client: sends bytes as given, reads complete replies (lists of lines).
    Every read is bounded by the socket timeout."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock: socket.socket = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.pending = b""

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> str | None:
        while b"\r\n" not in self.pending:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no reply within {self.sock.gettimeout()} s "
                                     f"(received so far: {self.pending[:200]!r})") from None
            except ConnectionResetError:  # closed with our input unread
                chunk = b""
            if not chunk:
                return None
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line.decode("utf-8", "replace")

    def reply(self) -> list[str]:
        lines: list[str] = []
        while True:
            line = self._line()
            if line is None:
                raise EOFError(f"connection closed after {lines!r}")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def last(self) -> str:
        """The last line of the next reply."""
        return self.reply()[-1]

    def replies(self, count: int) -> list[str]:
        return [self.last() for _ in range(count)]

    def closed_by_server(self) -> bool:
        """True once the server has closed (EOF), with nothing more said; False if it sent
        more. Bounded by the socket timeout."""
        if self.pending:
            return False
        try:
            return self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    def start_tls(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock, server_hostname=HOSTNAME)


def without_trace(stored: bytes) -> bytes:
    """The message as the client sent it: our Received: header (three lines) must be on
    top, naming the queue ID, and is taken off."""
    first, by, when, rest = stored.split(b"\r\n", 3)
    assert first.startswith(b"Received: from ") and b" [127.0.0.1])" in first, stored[:200]
    assert re.match(rb"\tby mx\.mailmoat\.test \(mailmoat\) with ESMTPS?A? id \w+;?$", by), \
        stored[:200]
    assert when.startswith(b"\tfor <") or when.startswith(b"\t"), stored[:200]
    return rest


def greeted(port: int) -> Client:
    client = Client(port)
    assert client.last().startswith("220 "), "no banner"
    return client


# -- pipelining ----------------------------------------------------------------------------------
def test_pipelined_commands_are_answered_in_order_and_the_message_queued(
        gateway: tuple[int, Queue]) -> None:
    port, queue = gateway
    with greeted(port) as client:
        client.send(b"EHLO client.example\r\nMAIL FROM:<app@example.jp> BODY=8BITMIME\r\n"
                    b"RCPT TO:<r1@example.jp>\r\nRCPT TO:<r2@example.jp>\r\n"
                    b"RCPT TO:<r3@example.jp>\r\nDATA\r\n")
        ehlo = client.reply()
        assert ehlo[0] == f"250-{HOSTNAME}" and "250-PIPELINING" in ehlo
        assert client.replies(5) == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                                     "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
        client.send(b"Subject: pipelined\r\n\r\n..leading dot\r\nbody\r\n.\r\nQUIT\r\n")
        queued = client.last()
        assert queued.startswith("250 2.0.0 Ok: queued as "), queued
        assert client.last() == "221 2.0.0 Bye"
        assert client.closed_by_server()
    queue_id = queued.rsplit(" ", 1)[1]
    [envelope] = queue.entries()
    assert envelope.queue_id == queue_id and envelope.sender == "app@example.jp"
    assert [r.address for r in envelope.recipients] == ["r1@example.jp", "r2@example.jp",
                                                        "r3@example.jp"]
    assert without_trace(queue.message(queue_id)) == \
        b"Subject: pipelined\r\n\r\n.leading dot\r\nbody\r\n"


def test_two_messages_and_quit_in_one_write(gateway: tuple[int, Queue]) -> None:
    """What follows the end of data in the same packet is the next command, not lost."""
    port, queue = gateway
    one = (b"MAIL FROM:<a@example.jp>\r\nRCPT TO:<t@example.jp>\r\nDATA\r\n"
           b"Subject: %d\r\n\r\nbody\r\n.\r\n")
    with greeted(port) as client:
        client.send(b"EHLO c.example\r\n" + one % 1 + one % 2 + b"QUIT\r\n")
        client.reply()
        replies = client.replies(9)
        assert [r[:3] for r in replies] == ["250", "250", "354", "250"] * 2 + ["221"], replies
        assert client.closed_by_server()
    stored = sorted(without_trace(queue.message(e.queue_id)) for e in queue.entries())
    assert stored == [b"Subject: 1\r\n\r\nbody\r\n", b"Subject: 2\r\n\r\nbody\r\n"]


def test_a_long_line_pipelined_behind_a_slow_command_is_not_stalled(tmp_path: Path) -> None:
    """The client sends everything at once while the server checks a password (scrypt runs
    in a thread): more than a megabyte piles up and the server stops reading. A message
    line longer than that must still be read, not wait for the idle timeout."""
    users = tmp_path / "users"
    set_password(users, "taro", PASSWORD)
    long_line = b"x" * (3 << 20)
    credentials = base64.b64encode(b"\0taro\0" + PASSWORD.encode())
    with server(tmp_path / "spool", users=UserFile(users), timeout=3.0,
                max_message_size=8 << 20) as (port, queue):
        with greeted(port) as client:
            started = time.monotonic()
            client.send(b"EHLO c.example\r\nAUTH PLAIN " + credentials + b"\r\n"
                        b"MAIL FROM:<a@example.jp>\r\nRCPT TO:<t@example.jp>\r\nDATA\r\n"
                        b"Subject: long\r\n\r\n" + long_line + b"\r\n.\r\nQUIT\r\n")
            client.reply()
            try:
                replies = client.replies(6)
            except (AssertionError, EOFError) as exc:
                pytest.fail(f"the server stalled on the long line: {exc}")
            assert replies[-2].startswith("250 2.0.0 Ok: queued as "), replies
            assert time.monotonic() - started < 4
        [envelope] = queue.entries()
        assert without_trace(queue.message(envelope.queue_id)) == \
            b"Subject: long\r\n\r\n" + long_line + b"\r\n"


# -- command line syntax and order ----------------------------------------------------------------
@pytest.mark.parametrize("commands", [b"EHLO c.example\r\nNOOP\n",
                                      b"EHLO c.example\r\nMAIL FROM:<a@example.jp>\nRSET\r\n",
                                      b"EHLO c.example\r\n\n"])
def test_a_bare_lf_in_a_command_ends_the_session(gateway: tuple[int, Queue],
                                                 commands: bytes) -> None:
    port, _ = gateway
    with greeted(port) as client:
        client.send(commands)
        client.reply()
        assert client.last().startswith("521 5.5.2 ")
        assert client.closed_by_server()


@pytest.mark.parametrize("commands, expected", [
    pytest.param([b"MAIL FROM:<a@example.jp>"], ["503"], id="MAIL-before-EHLO"),
    pytest.param([b"EHLO c", b"RCPT TO:<t@example.jp>"], ["250", "503"], id="RCPT-before-MAIL"),
    pytest.param([b"EHLO c", b"DATA"], ["250", "503"], id="DATA-before-MAIL"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp>", b"DATA"], ["250", "250", "554"],
                 id="DATA-without-RCPT"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp>", b"MAIL FROM:<b@example.jp>"],
                 ["250", "250", "503"], id="nested-MAIL"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp> SIZE=999999999999999999999"],
                 ["250", "552"], id="SIZE-huge"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp> SIZE=200001"], ["250", "552"],
                 id="SIZE-limit+1"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp> SIZE=200000"], ["250", "250"],
                 id="SIZE-at-limit"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp> XFOO=1"], ["250", "555"],
                 id="unknown-MAIL-parameter"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp> SIZE=12x"], ["250", "501"],
                 id="SIZE-not-a-number"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp> SIZE=\xc2\xb2"], ["250", "501"],
                 id="SIZE-superscript-two"),  # "²".isdigit() is True, int("²") fails
    pytest.param([b"EHLO c", "MAIL FROM:<太郎@example.jp>".encode()], ["250", "553"],
                 id="unicode-sender-without-SMTPUTF8"),
    pytest.param([b"EHLO c", "MAIL FROM:<太郎@example.jp> SMTPUTF8".encode()], ["250", "250"],
                 id="unicode-sender-with-SMTPUTF8"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp>", b"RCPT TO:<>"], ["250", "250", "501"],
                 id="null-recipient-from-internal-client"),
    pytest.param([b"EHLO c", b"MAIL FROM:<a@example.jp>", b"RCPT TO:<\xff@example.jp>"],
                 ["250", "250", "501"], id="non-UTF-8-recipient"),
    pytest.param([b"EHLO c", b"MAIL FROM:<> ", b"RCPT TO:<t@example.jp>"], ["250", "250", "250"],
                 id="null-sender"),
    pytest.param([b"EHLO c", b"MAIL FROM:a@example.jp SIZE=10", b"RCPT TO:t@example.jp"],
                 ["250", "250", "250"], id="no-angle-brackets-with-parameters"),
])
def test_command_order_and_mail_parameters(gateway: tuple[int, Queue], commands: list[bytes],
                                           expected: list[str]) -> None:
    port, queue = gateway
    with greeted(port) as client:
        client.send(b"".join(c + b"\r\n" for c in commands))
        replies = client.replies(len(commands))
        assert [r[:3] for r in replies] == expected, replies
        client.send(b"NOOP\r\n")  # the session goes on after a refused command
        assert client.last() == "250 2.0.0 Ok"
    assert queue.entries() == []


def test_data_with_an_argument_is_refused(gateway: tuple[int, Queue]) -> None:
    port, queue = gateway
    with greeted(port) as client:
        client.send(b"EHLO c\r\nMAIL FROM:<a@example.jp>\r\nRCPT TO:<t@example.jp>\r\n"
                    b"DATA now\r\nRSET\r\n")
        client.reply()
        assert [r[:3] for r in client.replies(4)] == ["250", "250", "501", "250"]
    assert queue.entries() == []


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_a_greeting_without_a_name_gets_only_its_501(gateway: tuple[int, Queue],
                                                     verb: bytes) -> None:
    """Even after a good one: the earlier name does not turn the error into a greeting."""
    port, _ = gateway
    with greeted(port) as client:
        client.send(b"EHLO c.example\r\n" + verb + b"\r\nNOOP\r\n")
        assert client.last().startswith("250 ")
        assert client.reply() == [f"501 5.5.4 Syntax: {verb.decode()} hostname"]
        assert client.last().startswith("250 2.0.0")


# -- STARTTLS ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={HOSTNAME}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.mark.parametrize("injected", [b"RSET\r\n", b"RSET\r\nNOOP\r\n",
                                      b"MAIL FROM:<evil@elsewhere.example>\r\n"])
def test_commands_pipelined_after_starttls_are_never_answered(
        tmp_path: Path, certificate: tuple[str, str], injected: bytes) -> None:
    """CVE-2011-0411: what came in the clear behind STARTTLS must be thrown away."""
    tls = server_tls_context(*certificate)
    with server(tmp_path / "spool", tls_context=tls) as (port, queue):
        with greeted(port) as client:
            client.send(b"EHLO c.example\r\n")
            assert "250-STARTTLS" in client.reply()
            client.send(b"STARTTLS\r\n" + injected)  # one packet
            assert client.last() == "220 2.0.0 Ready to start TLS"
            assert client.pending == b"", "answered in the clear after the 220"
            client.start_tls()
            client.send(b"EHLO c.example\r\nMAIL FROM:<a@example.jp>\r\n")
            ehlo = client.reply()
            assert ehlo[0] == f"250-{HOSTNAME}", f"first reply after TLS: {ehlo}"
            assert "250-STARTTLS" not in ehlo
            assert client.last() == "250 2.1.0 Ok"  # not "nested MAIL": nothing injected
            client.send(b"QUIT\r\n")
            assert client.last() == "221 2.0.0 Bye"


def test_starttls_forgets_an_authentication_made_before_it(
        tmp_path: Path, certificate: tuple[str, str]) -> None:
    """RFC 3207 4.2: after the handshake the server MUST discard what it learnt from the
    client before it. Credentials given in the clear (or injected by a man in the middle
    before the client's STARTTLS) must not make the encrypted session an authenticated one."""
    users = tmp_path / "users"
    set_password(users, "taro", PASSWORD)
    credentials = base64.b64encode(b"\0taro\0" + PASSWORD.encode())
    tls = server_tls_context(*certificate)
    with server(tmp_path / "spool", tls_context=tls, users=UserFile(users)) as (port, queue):
        with greeted(port) as client:
            client.send(b"EHLO c.example\r\nXCLIENT ADDR=192.0.2.9\r\n")
            client.reply()
            assert client.last().startswith("220 ")
            client.send(b"EHLO c.example\r\nAUTH PLAIN " + credentials + b"\r\n")
            client.reply()
            assert client.last().startswith("235 ")
            client.send(b"STARTTLS\r\n")
            assert client.last().startswith("220 ")
            client.start_tls()
            client.send(b"EHLO c.example\r\nMAIL FROM:<a@outside.example>\r\n"
                        b"RCPT TO:<someone@elsewhere.example>\r\n")
            client.reply()
            mail, rcpt = client.replies(2)
            assert mail == "250 2.1.0 Ok"
            assert rcpt.startswith("554 5.7.1 "), f"relay allowed after STARTTLS: {rcpt}"


# -- limits --------------------------------------------------------------------------------------
def test_too_many_errors_end_the_session(gateway: tuple[int, Queue]) -> None:
    port, _ = gateway
    with greeted(port) as client:
        client.send(b"FOO\r\n" * 19 + b"NOOP\r\n")
        assert client.replies(19) == ["502 5.5.2 Error: command not recognized"] * 19
        assert client.last() == "250 2.0.0 Ok"  # 19 errors are still tolerated
        client.send(b"FOO\r\nNOOP\r\n")
        lines = [client.last()]
        while not lines[-1].startswith("421"):
            assert len(lines) < 3 and lines[-1].startswith("502"), lines
            lines.append(client.last())
        assert lines[-1] == f"421 4.7.0 {HOSTNAME} Error: too many errors"
        assert client.closed_by_server()  # the NOOP behind it is never answered


@pytest.mark.parametrize("silent_after", [b"", b"EHLO c\r\nMAIL FROM:<a@example.jp>\r\n"
                                          b"RCPT TO:<t@example.jp>\r\nDATA\r\nSubject: half\r\n"])
def test_an_idle_client_is_dropped(tmp_path: Path, silent_after: bytes) -> None:
    with server(tmp_path / "spool", timeout=1.0) as (port, queue):
        with greeted(port) as client:
            client.sock.settimeout(4)
            started = time.monotonic()
            client.send(silent_after)
            lines = []
            while not (lines and lines[-1].startswith("421")):
                lines.append(client.last())
                assert len(lines) < 10, lines
            waited = time.monotonic() - started
            assert lines[-1] == f"421 4.4.2 {HOSTNAME} Error: timeout exceeded"
            assert 0.8 <= waited < 3.5, waited
            assert client.closed_by_server()
        assert queue.entries() == []


# -- SMTP AUTH -----------------------------------------------------------------------------------
@pytest.fixture
def auth_gateway(tmp_path: Path) -> Iterator[tuple[int, Queue]]:
    users = tmp_path / "users"
    set_password(users, "taro", PASSWORD)
    with server(tmp_path / "spool", users=UserFile(users)) as running:
        yield running


def auth_args(mechanism: str, password: str = PASSWORD, optional: bool = False) -> list[str]:
    return ["--auth-optional" if optional else "--auth", mechanism,
            "--auth-user", "taro", "--auth-password", password]


def test_auth_is_advertised_to_loopback(auth_gateway: tuple[int, Queue]) -> None:
    port, _ = auth_gateway
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.has_extn("auth")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_an_authenticated_outside_client_may_relay(auth_gateway: tuple[int, Queue],
                                                    mechanism: str) -> None:
    port, queue = auth_gateway
    result = run_swaks(port, mail_from="taro@outside.example", rcpt="someone@elsewhere.example",
                       xclient_addr="192.0.2.9", extra_args=auth_args(mechanism))
    assert "235 2.7.0 Authentication successful" in result.transcript, result.transcript
    assert result.code("RCPT") == 250, result.transcript
    line = result.reply_by_stage["DATA_END"]
    assert line.startswith("250 2.0.0 Ok: queued as "), result.transcript
    envelope = queue.envelope(line.rsplit(" ", 1)[1])
    assert envelope.extra["auth_user"] == "taro"
    assert envelope.client_ip == "192.0.2.9"
    assert [r.address for r in envelope.recipients] == ["someone@elsewhere.example"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_a_wrong_password_is_refused_and_relay_stays_denied(auth_gateway: tuple[int, Queue],
                                                            mechanism: str) -> None:
    port, queue = auth_gateway
    result = run_swaks(port, mail_from="taro@outside.example", rcpt="someone@elsewhere.example",
                       xclient_addr="192.0.2.9",
                       extra_args=auth_args(mechanism, "wrong pass", optional=True))
    assert "535 5.7.8 Error: authentication failed" in result.transcript, result.transcript
    assert result.reply_by_stage["RCPT"].startswith("554 5.7.1 "), result.transcript
    assert queue.entries() == []


def test_smtplib_login_and_the_auth_user_on_the_envelope(auth_gateway: tuple[int, Queue]) -> None:
    port, queue = auth_gateway
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        client.ehlo("client.example")
        code, _ = client.docmd("XCLIENT", "ADDR=192.0.2.9")
        assert code == 220
        client.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("taro", "not the password")
        assert refused.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("nobody", PASSWORD)
        client.login("taro", PASSWORD)
        assert client.docmd("AUTH", "PLAIN " + base64.b64encode(
            b"\0taro\0" + PASSWORD.encode()).decode())[0] == 503  # once per session
        client.sendmail("taro@outside.example", ["someone@elsewhere.example"],
                        b"Subject: via smtplib\r\n\r\nhello\r\n")
    [envelope] = queue.entries()
    assert envelope.extra["auth_user"] == "taro"


def test_auth_without_a_users_file_is_not_enabled(gateway: tuple[int, Queue]) -> None:
    port, _ = gateway
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        client.ehlo("client.example")
        assert not client.has_extn("auth")
        code, message = client.docmd("AUTH", "PLAIN " + base64.b64encode(
            b"\0taro\0" + PASSWORD.encode()).decode())
        assert code == 502, message
        code, message = client.docmd("AUTH", "LOGIN")
        assert code == 502, message


# -- milters that fail ---------------------------------------------------------------------------
def chain_of(endpoint: MilterEndpoint, on_failure: str):  # type: ignore[no-untyped-def]
    return lambda: ChainSession([ChainMember(endpoint, on_failure=on_failure)])


def outside(port: int):  # type: ignore[no-untyped-def]
    return run_swaks(port, mail_from="a@outside.example", rcpt="taro@example.jp",
                     xclient_addr="192.0.2.9", timeout=10)


def test_a_milter_that_is_down_tempfails_at_mail_from(tmp_path: Path) -> None:
    endpoint = MilterEndpoint("down", f"inet:{LOOPBACK}:{free_port()}", connect_timeout=1)
    with server(tmp_path / "spool", chain_of(endpoint, "tempfail")) as (port, queue):
        result = outside(port)
    assert result.reply_by_stage["MAIL"].startswith("451 4.7.1"), result.transcript
    assert result.code("DATA_END") is None
    assert queue.entries() == []


def test_a_milter_that_is_down_with_on_failure_accept_lets_mail_through(tmp_path: Path) -> None:
    endpoint = MilterEndpoint("down", f"inet:{LOOPBACK}:{free_port()}", connect_timeout=1)
    with server(tmp_path / "spool", chain_of(endpoint, "accept")) as (port, queue):
        result = outside(port)
    assert result.code("DATA_END") == 250, result.transcript
    assert len(queue.entries()) == 1


@contextmanager
def silent_milter() -> Iterator[int]:
    """A TCP server that accepts and reads whatever it is sent and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(8)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def run() -> None:
        while not stop.is_set():
            readable, _, _ = select.select([listener, *accepted], [], [], 0.1)
            for sock in readable:
                if sock is listener:
                    accepted.append(listener.accept()[0])
                elif not sock.recv(65536):
                    accepted.remove(sock)
                    sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for sock in [listener, *accepted]:
            sock.close()


@pytest.mark.parametrize("on_failure, code", [("tempfail", "451"), ("accept", "250")])
def test_a_milter_that_never_answers_does_not_hang_the_session(
        tmp_path: Path, on_failure: str, code: str) -> None:
    with silent_milter() as milter_port:
        endpoint = MilterEndpoint("silent", f"inet:{LOOPBACK}:{milter_port}",
                                  connect_timeout=1, command_timeout=0.5)
        with server(tmp_path / "spool", chain_of(endpoint, on_failure)) as (port, queue):
            with greeted(port) as client:
                started = time.monotonic()
                client.send(b"EHLO c.example\r\nXCLIENT ADDR=192.0.2.9\r\n")
                client.reply()
                assert client.last().startswith("220 ")
                client.send(b"EHLO c.example\r\nMAIL FROM:<a@outside.example>\r\n")
                client.reply()
                mail = client.last()
                assert mail.startswith(code), mail
                if code == "451":
                    assert mail.startswith("451 4.7.1")
                assert time.monotonic() - started < 4


@pytest.mark.parametrize("exchange", [
    ["AUTH LOGIN", "*"],                                        # cancel at the user prompt
    ["AUTH LOGIN " + base64.b64encode(b"taro").decode(), "*"],  # cancel at the password
    ["AUTH PLAIN", "*"],                                        # cancel after "334 "
])
def test_a_cancelled_authentication_gets_501_and_the_session_goes_on(
        auth_gateway: tuple[int, Queue], exchange: list[str]) -> None:
    port, _ = auth_gateway
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        client.ehlo("client.example")
        replies = [client.docmd(line) for line in exchange]
        assert [code for code, _ in replies[:-1]] == [334] * (len(exchange) - 1)
        assert replies[-1] == (501, b"5.7.0 Authentication cancelled")
        assert client.noop()[0] == 250  # not authenticated, still connected
        client.login("taro", PASSWORD)  # and a proper attempt still works


@pytest.mark.parametrize("hops, reply", [(49, 250), (50, 554)])
def test_a_mail_loop_is_refused_at_50_received_headers(gateway: tuple[int, Queue], hops: int,
                                                       reply: int) -> None:
    """Postfix's hopcount_limit: two gateways relaying to each other must not loop forever."""
    port, queue = gateway
    trace = b"".join(b"Received: from hop%d by relay%d\r\n" % (i, i) for i in range(hops))
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        client.ehlo("client.example")
        client.mail("a@example.jp")
        client.rcpt("t@example.jp")
        code, message = client.data(trace + b"Subject: loop\r\n\r\nbody\r\n")
    assert code == reply, message
    if reply == 554:
        assert message == b"5.4.0 Error: too many hops (mail loop?)"
        assert queue.entries() == []
    else:
        assert len(queue.entries()) == 1


# -- the spool file opened while the milters work on MAIL ---------------------------------------
def waits_for(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def actions_chain(port: int):  # type: ignore[no-untyped-def]
    return chain_of(MilterEndpoint("actions", f"inet:{LOOPBACK}:{port}"), "tempfail")


@pytest.mark.parametrize("ending", [
    b"RSET\r\n", b"QUIT\r\n", b"", b"EHLO again.example\r\n",
    b"RCPT TO:<reject-me@example.jp>\r\nRSET\r\n"])
def test_a_transaction_that_ends_before_data_leaves_no_spool_file(
        tmp_path: Path, action_milter: int, ending: bytes) -> None:
    """With milters, MAIL opens the message's spool file while they work (DATA then starts
    at once); every way a transaction can end before DATA removes it again, a client that
    just hangs up included."""
    with server(tmp_path / "spool", actions_chain(action_milter)) as (port, queue):
        tmp = tmp_path / "spool" / "tmp"
        with greeted(port) as client:
            client.send(b"EHLO client.example\r\n")
            client.reply()
            client.send(b"MAIL FROM:<a@outside.example>\r\nRCPT TO:<taro@example.jp>\r\n")
            assert client.replies(2) == ["250 2.1.0 Ok", "250 2.1.5 Ok"]
            assert len(list(tmp.iterdir())) == 1  # opened at MAIL, before any DATA
            client.send(ending)
            if ending:
                client.reply()
        assert waits_for(lambda: not list(tmp.iterdir())), list(tmp.iterdir())
        assert queue.entries() == []


def test_without_milters_the_spool_file_is_opened_after_the_mail_reply_too(
        gateway: tuple[int, Queue], tmp_path: Path) -> None:
    port, queue = gateway
    tmp = tmp_path / "spool" / "tmp"
    with greeted(port) as client:
        client.send(b"EHLO client.example\r\nMAIL FROM:<a@outside.example>\r\n"
                    b"RCPT TO:<taro@example.jp>\r\n")
        assert client.replies(3)[1:] == ["250 2.1.0 Ok", "250 2.1.5 Ok"]
        assert len(list(tmp.iterdir())) == 1
        client.send(b"RSET\r\n")
        assert client.last() == "250 2.0.0 Ok"
        assert not list(tmp.iterdir())
        client.send(b"MAIL FROM:<a@outside.example>\r\nRCPT TO:<taro@example.jp>\r\nDATA\r\n")
        assert client.replies(3)[2].startswith("354 ")
        client.send(b"Subject: plain\r\n\r\nhello\r\n.\r\n")
        assert client.last().startswith("250 2.0.0 Ok: queued as ")
    [envelope] = queue.entries()
    assert without_trace(queue.message(envelope.queue_id)) == b"Subject: plain\r\n\r\nhello\r\n"
    assert not list(tmp.iterdir())


def test_a_message_through_the_early_spool_file_is_queued_whole(tmp_path: Path,
                                                                 action_milter: int) -> None:
    with server(tmp_path / "spool", actions_chain(action_milter)) as (port, queue):
        with greeted(port) as client:
            client.send(b"EHLO client.example\r\nMAIL FROM:<a@outside.example>\r\n"
                        b"RCPT TO:<taro@example.jp>\r\nDATA\r\n")
            assert client.replies(4)[1:] == ["250 2.1.0 Ok", "250 2.1.5 Ok",
                                             "354 End data with <CR><LF>.<CR><LF>"]
            client.send(b"Subject: early spool\r\n\r\nbody line\r\n.\r\nQUIT\r\n")
            assert client.last().startswith("250 2.0.0 Ok: queued as ")
        [envelope] = queue.entries()
        stored = queue.message(envelope.queue_id)
        # Our trace header and the client's 11-byte body reached the milter through the
        # file (it reports the body chunks it saw, then edits the message as always).
        assert b"\r\nReceived: from client.example (unknown [127.0.0.1])\r\n" in stored
        assert b"X-Seen-Chunks: 11\r\n" in stored
        assert not list((tmp_path / "spool" / "tmp").iterdir())
