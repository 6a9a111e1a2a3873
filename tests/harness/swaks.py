"""Run the real swaks against 127.0.0.1:<port> and parse its transcript.

    result = run_swaks(pf.smtp_port, mail_from="a@example.org", rcpt="b@example.net",
                       xclient_addr="192.0.2.10", header=["Subject: hi"])
    assert result.reply_by_stage["MAIL"].startswith("451 4.7.1")

swaks marks what the server said with `<-` (`<**` when swaks considers it an
error, `<~`/`<~*` under TLS) and what it sent with ` ->` (`**>`, ` ~>`, `*~>`).
Replies are matched to commands in order, which also holds with --pipeline.
Stage names: CONNECT (banner), EHLO/HELO, XCLIENT, STARTTLS, AUTH, MAIL,
RCPT, DATA (the 354), DATA_END (the reply after the final dot), QUIT, and any
other verb as sent.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.harness.ports import LOOPBACK

SWAKS = "/usr/bin/swaks"

_SENT = re.compile(r"^( ->|\*\*>| ~>|\*~>) (.*)$")
_RECEIVED = re.compile(r"^(<- |<\*\*|<~ |<~\*) (.*)$")
_REPLY_LINE = re.compile(r"^(\d{3})([ -]|$)(.*)$")
# With --suppress-data swaks prints the content as one summary line.
_DATA_SUMMARY = re.compile(r"^\d+ lines sent$")


@dataclass(frozen=True)
class SmtpExchange:
    """One command (or the banner) and the complete reply to it."""

    stage: str
    command: str | None
    code: int
    lines: tuple[str, ...]

    @property
    def last_line(self) -> str:
        """The line that carries the final code, e.g. '451 4.7.1 Service unavailable'."""
        return self.lines[-1]


@dataclass
class SwaksResult:
    returncode: int
    transcript: str
    # Code of the reply that decided the outcome: the one after the final dot if
    # the client got that far, else the last reply to anything but QUIT.
    final_reply_code: int | None
    # Stage -> last line of the last reply at that stage ("451 4.7.1 ...").
    reply_by_stage: dict[str, str] = field(default_factory=dict)
    exchanges: list[SmtpExchange] = field(default_factory=list)

    def code(self, stage: str) -> int | None:
        """Reply code at `stage` (the last one if the stage repeats, e.g. RCPT)."""
        for exchange in reversed(self.exchanges):
            if exchange.stage == stage:
                return exchange.code
        return None

    def replies(self, stage: str) -> list[str]:
        """Last lines of every reply at `stage`, in order (one per RCPT, say)."""
        return [e.last_line for e in self.exchanges if e.stage == stage]


def _stage_of(command: str) -> str:
    verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
    return verb or "UNKNOWN"


def parse_transcript(transcript: str) -> list[SmtpExchange]:
    """Pair the server's replies with the commands swaks sent, in order."""
    exchanges: list[SmtpExchange] = []
    pending: list[tuple[str, str | None]] = []
    in_data = False
    seen_reply = False
    reply_lines: list[str] = []
    for raw_line in transcript.splitlines():
        line = raw_line.rstrip("\r")
        sent = _SENT.match(line)
        if sent:
            text = sent.group(2)
            if in_data:
                # Content lines are not commands; only the end of the content is.
                if text == "." or _DATA_SUMMARY.match(text):
                    pending.append(("DATA_END", None))
                    in_data = False
                continue
            pending.append((_stage_of(text), text))
            continue
        received = _RECEIVED.match(line)
        if not received:
            continue
        text = received.group(2)
        reply = _REPLY_LINE.match(text)
        if not reply:
            continue
        reply_lines.append(text)
        if reply.group(2) == "-":
            continue  # continuation line of a multi-line reply
        if pending:
            stage, command = pending.pop(0)
        else:
            stage, command = ("CONNECT" if not seen_reply else "UNSOLICITED"), None
        seen_reply = True
        code = int(reply.group(1))
        exchanges.append(SmtpExchange(stage, command, code, tuple(reply_lines)))
        reply_lines = []
        if stage == "DATA" and code == 354:
            in_data = True
    return exchanges


def _final_code(exchanges: Sequence[SmtpExchange]) -> int | None:
    for exchange in reversed(exchanges):
        if exchange.stage == "DATA_END":
            return exchange.code
    for exchange in reversed(exchanges):
        if exchange.stage != "QUIT":
            return exchange.code
    return None


def run_swaks(port: int, *, mail_from: str, rcpt: str | Sequence[str],
              xclient_addr: str | None = None, xclient_name: str | None = None,
              helo: str = "client.example", body: str | bytes | None = None,
              header: str | Sequence[str] | None = None,
              data_file: str | os.PathLike[str] | None = None,
              extra_args: Sequence[str] = (), timeout: float = 30,
              suppress_data: bool = True, host: str = LOOPBACK) -> SwaksResult:
    """Send one message with /usr/bin/swaks to host:port (loopback by default).

    xclient_addr: send XCLIENT ADDR=<addr> NAME=<xclient_name or [UNAVAILABLE]>;
    Postfix keeps the real peer's name if NAME is not sent (it would log
    client=localhost[192.0.2.10]).
    header: "Name: value" strings, each passed as --header (replaces swaks' own).
    body: written to a temp file so that bytes and newlines reach swaks unaltered.
    data_file: the whole DATA content (headers and body) from a file.
    """
    rcpts = [rcpt] if isinstance(rcpt, str) else list(rcpt)
    args = [
        SWAKS, "--config",  # no argument: ignore any ~/.swaksrc
        "--server", host, "--port", str(port),
        "--from", mail_from, "--to", ",".join(rcpts),
        "--helo", helo, "--timeout", f"{max(1, int(timeout))}s",
    ]
    if xclient_addr is not None:
        args += ["--xclient-addr", xclient_addr,
                 "--xclient-name", xclient_name or "[UNAVAILABLE]"]
    elif xclient_name is not None:
        args += ["--xclient-name", xclient_name]
    headers = [header] if isinstance(header, str) else list(header or [])
    for item in headers:
        args += ["--header", item]
    if suppress_data:
        args.append("--suppress-data")
    tmp_body: str | None = None
    try:
        if data_file is not None:
            args += ["--data", "@" + os.fspath(data_file)]
        if body is not None:
            fd, tmp_body = tempfile.mkstemp(prefix="swaks-body-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(body.encode("utf-8") if isinstance(body, str) else body)
            args += ["--body", "@" + tmp_body]
        args += list(extra_args)
        # stderr joins stdout so swaks' *** errors stay in order with the dialogue.
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout + 15, check=False)
    finally:
        if tmp_body is not None:
            os.unlink(tmp_body)
    transcript = proc.stdout.decode("utf-8", errors="replace")
    exchanges = parse_transcript(transcript)
    by_stage: dict[str, str] = {}
    for exchange in exchanges:
        by_stage[exchange.stage] = exchange.last_line
    return SwaksResult(
        returncode=proc.returncode,
        transcript=transcript,
        final_reply_code=_final_code(exchanges),
        reply_by_stage=by_stage,
        exchanges=exchanges,
    )
