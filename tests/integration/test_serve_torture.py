"""Broken messages through `mailmoat serve` with the attachments (encrypt everything) and
neutralize milters: each gets a defined SMTP reply within the stage timeouts, no milter
connection fails, no traceback is logged. Sent over a raw socket, so bare CR and NUL reach
the gateway as a hostile client sends them (smtplib would repair line ends)."""
from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

POLICY = "internal_networks: [127.0.0.0/8]\ndefaults: {attachments: encrypt}\n"
HEAD = b"From: a@example.jp\r\nTo: taro@example.jp\r\nMessage-ID: <t@example.jp>\r\n"


def _nested(depth: int) -> bytes:
    text = b"Content-Type: text/plain\r\n\r\nhttp://inner.example/\r\n"
    for level in range(depth):
        text = (f"Content-Type: multipart/mixed; boundary=\"b{level}\"\r\n\r\n--b{level}\r\n"
                .encode() + text + f"\r\n--b{level}--\r\n".encode())
    return text


TORTURE: dict[str, bytes] = {
    "200 KB Subject": HEAD + b"Subject: " + b"s" * 200_000 + b"\r\n\r\nbody\r\n",
    "135 KB To": b"From: a@example.jp\r\nTo: " + b"u@customer.example, " * 6750 + b"\r\n\r\nx\r\n",
    "unindented continuation": HEAD + b"Subject: t\r\nno colon here\r\n" + b"z" * 70_000
    + b"\r\n\r\nbody\r\n",
    "name not UTF-8": HEAD + b"X-Bad\xff\xfeName: v\xe9\r\n\r\nbody\r\n",
    "bare CR": HEAD.replace(b"\r\n", b"\r") + b"\rline one\rhttp://cr.example/\r",
    "NUL bytes": HEAD + b"Subject: a\0b\r\n\r\nbody\0with NUL http://nul.example/\r\n",
    "50-deep multipart": HEAD + b"MIME-Version: 1.0\r\n" + _nested(50),
    "missing final boundary": HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
    b"boundary=zz\r\n\r\n--zz\r\nContent-Type: application/pdf; name=a.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n",
    "no blank line before body": HEAD + b"Content-Type: text/plain\r\nbody right here\r\n",
    "headers only": HEAD.rstrip(b"\r\n"),
}


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def send_raw(port: int, message: bytes, timeout: float) -> int:
    """One SMTP transaction with the message's bytes as they are (dot-stuffed only)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        _read_reply(sock)
        for line in (b"EHLO client.example", b"MAIL FROM:<a@example.jp>",
                     b"RCPT TO:<taro@example.jp>", b"DATA"):
            sock.sendall(line + b"\r\n")
            reply = _read_reply(sock)
            if not reply[:1] in (b"2", b"3"):
                return int(reply[:3])
        stuffed = re.sub(rb"(^|\r\n)\.", rb"\1..", message)
        ending = b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n"
        sock.sendall(stuffed + ending)
        reply = _read_reply(sock)
        sock.sendall(b"QUIT\r\n")
        return int(reply[:3])


def test_every_broken_message_gets_a_defined_reply(tmp_path: Path) -> None:
    milters = ("milters:\n  - {name: attachments, content_timeout: 30s}\n"
               "  - {name: neutralize, content_timeout: 30s}\n")
    gateway = Serve(tmp_path, policy=POLICY, milters=milters).start()
    replies: dict[str, int] = {}
    try:
        for what, message in TORTURE.items():
            # Longer than the stage timeouts: a hang shows as a socket timeout here.
            replies[what] = send_raw(gateway.port, message, timeout=90)
    finally:
        gateway.stop()
    log = gateway.text()
    assert "milter_failed" not in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    # A defined reply: accepted, or refused by a milter's or smtpd's own verdict; never
    # the tempfail a failed milter connection gives.
    assert all(code == 250 or 500 <= code < 600 for code in replies.values()), replies
