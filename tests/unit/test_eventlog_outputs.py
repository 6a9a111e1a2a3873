"""gateway.log: key=value lines by default, JSON lines with the same keys on request, and
syslog (facility mail) through a unix datagram socket the test opens in place of /dev/log."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.errors import MailmoatError
from milters.core.eventlog import (SYSLOG_SOCKET_ENV, LogSettings, format_event, log_event,
                                   setup_logging)

FIELDS = {"queue_id": "4F2A1", "ip": "192.0.2.7", "points": 12.5,
          "reply": '550 5.7.1 "no" = x\nforged=1', "absent": None}


def _parse_keyvalue(line: str) -> dict[str, str]:
    """Split a key=value line back (quoted values unescaped): the format's own promise."""
    pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line.split(": ", 1)[1])
    out = {}
    for key, value in pairs:
        if value.startswith('"'):
            value = (value[1:-1].replace("\\n", "\n").replace("\\r", "\r")
                     .replace('\\"', '"').replace("\\\\", "\\"))
        out[key] = value
    return out


@pytest.fixture
def pipe_stderr() -> Iterator[int]:
    """The logging handler writes to stderr's descriptor: the lines a test logs go to a
    pipe (setup_logging takes the descriptor from sys.stderr, swapped in by _to)."""
    read, write = os.pipe()
    _PIPE[:] = [write]
    try:
        yield read
    finally:
        setup_logging("test")
        os.close(write)
        os.close(read)


_PIPE: list[int] = []


def _to_pipe(program: str, settings: LogSettings | None = None) -> None:
    # Inside the test body: pytest swaps sys.stderr back in between fixtures and the test.
    saved = sys.stderr
    sys.stderr = os.fdopen(_PIPE[0], "w", closefd=False)
    try:
        setup_logging(program, settings=settings)
    finally:
        sys.stderr.close()
        sys.stderr = saved


def _lines(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    return os.read(fd, 65536).decode().splitlines()


def test_key_value_is_the_default_and_json_lines_carry_the_same_keys(pipe_stderr: int
                                                                     ) -> None:
    _to_pipe("ratelimit")
    log_event("tempfail", **FIELDS)
    [plain] = _lines(pipe_stderr)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ mailmoat/ratelimit\[\d+\]: "
                    r"event=tempfail ", plain)
    _to_pipe("ratelimit", LogSettings(format="json"))
    log_event("tempfail", **FIELDS)
    [line] = _lines(pipe_stderr)
    record = json.loads(line)
    assert record["program"] == f"mailmoat/ratelimit[{os.getpid()}]"
    assert record["level"] == "info" and record["time"].endswith("Z")
    from_keyvalue = _parse_keyvalue(plain)
    # The same keys (None left out in both); the values the same text, numbers as numbers.
    assert set(record) - {"time", "program", "level"} == set(from_keyvalue)
    assert record["reply"] == from_keyvalue["reply"] == FIELDS["reply"]
    assert record["points"] == 12.5 and from_keyvalue["points"] == "12.5"


def test_a_field_cannot_forge_the_head_of_a_json_line_and_is_kept(pipe_stderr: int
                                                                   ) -> None:
    _to_pipe("auth", LogSettings(format="json"))
    log_event("x", program="mailmoat/evil", time="then", pid=1234)
    record = json.loads(_lines(pipe_stderr)[0])
    assert (record["program"], record["level"]) == (f"mailmoat/auth[{os.getpid()}]", "info")
    assert record["time"] != "then"
    # Nothing lost: a child's pid (serve's milter_process_started) stays the event's own.
    assert (record["event_program"], record["event_time"], record["pid"]) == (
        "mailmoat/evil", "then", 1234)


def test_a_plain_logger_message_becomes_a_json_line_too(pipe_stderr: int) -> None:
    _to_pipe("serve", LogSettings(format="json"))
    logging.getLogger("mailmoat").warning("free text with \"quotes\"")
    record = json.loads(_lines(pipe_stderr)[0])
    assert record["event"] == "message" and record["text"] == 'free text with "quotes"'
    assert record["level"] == "warning"


@pytest.fixture
def syslog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    monkeypatch.setenv(SYSLOG_SOCKET_ENV, path)
    try:
        yield sock
    finally:
        setup_logging("test")
        sock.close()


@pytest.mark.parametrize("fmt", ["keyvalue", "json"])
def test_syslog_lines_have_facility_mail_and_the_program_tag(syslog: socket.socket,
                                                             fmt: str) -> None:
    setup_logging("delivery", settings=LogSettings(format=fmt, to="syslog"))
    log_event("delivered", queue_id="ABC123", to="taro@example.jp")
    log_event("delivery_failed", level=logging.ERROR, queue_id="ABC123")
    info, error = syslog.recv(65536).decode(), syslog.recv(65536).decode()
    # <PRI> = facility * 8 + severity: mail (2) with info (6) and err (3).
    assert info.startswith("<22>") and error.startswith("<19>")
    if fmt == "keyvalue":
        assert re.fullmatch(rf"<22>mailmoat/delivery\[{os.getpid()}\]: event=delivered "
                            r"queue_id=ABC123 to=taro@example.jp\x00?", info)
    else:
        record = json.loads(info[4:].rstrip("\x00"))
        assert record["event"] == "delivered" and record["queue_id"] == "ABC123"
        assert "time" not in record  # syslog stamps its lines


def test_no_syslog_daemon_is_a_clear_error(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SYSLOG_SOCKET_ENV, str(tmp_path / "nothing-here"))
    with pytest.raises(MailmoatError, match=r"gateway.log.to: syslog: cannot reach "
                                            r".*nothing-here.*syslog daemon"):
        setup_logging("serve", settings=LogSettings(to="syslog"))


def test_the_key_value_form_is_unchanged() -> None:
    assert format_event("e", {"a": "b c", "n": None}) == 'event=e a="b c"'
