"""One key=value line per event, like Postfix's logs, so `grep ID` tells a message's story.

    2026-11-28T20:41:26Z mailmoat/ratelimit[1234]: event=tempfail queue_id=4F2A1 ip=192.0.2.7 points=12.5

Values with spaces, quotes or '=' are double-quoted with backslash escapes; None values are left out.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

_LOGGER = logging.getLogger("mailmoat")
_SAFE = re.compile(r"[a-zA-Z0-9._\-:/@\[\]+,<>]+")  # values written without quotes


def format_value(value: Any) -> str:
    """Render one value so that a key=value line can be split back unambiguously."""
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") or "0"
    else:
        text = str(value)
    if _SAFE.fullmatch(text):
        return text
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"')
               .replace("\n", "\\n").replace("\r", "\\r"))
    return f'"{escaped}"'


def format_event(event: str, fields: dict[str, Any]) -> str:
    parts = [f"event={format_value(event)}"]
    parts += [f"{key}={format_value(val)}" for key, val in fields.items() if val is not None]
    return " ".join(parts)


def log_event(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event; pass queue_id=... whenever the message has one."""
    _LOGGER.log(level, format_event(event, fields))


class _UtcFormatter(logging.Formatter):
    """`2026-11-28T20:41:26Z mailmoat/PROGRAM[PID]: message`; the time text is made once
    per second, not once per line (strftime showed up in the MTA's profile)."""

    def __init__(self, program: str) -> None:
        super().__init__()
        self._tag = f"mailmoat/{program}[{os.getpid()}]"
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = f"{self._stamp}Z {self._tag}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _LineHandler(logging.Handler):
    """Each line in one write(2) to a file descriptor, without logging's handler lock: a
    line up to PIPE_BUF bytes is written whole to a pipe or an O_APPEND file, so threads
    cannot interleave (the lock cost the auth milter an eighth of its CPU)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def createLock(self) -> None:  # noqa: N802 (logging's name)
        self.lock = None  # type: ignore[assignment]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            while data:
                data = data[os.write(self.fd, data):]
        except Exception:  # logging must never take a milter down
            self.handleError(record)


def setup_logging(program: str, *, verbose: bool = False) -> None:
    """Send mailmoat's event lines to stderr (systemd/journald or the caller collects them)."""
    sys.stderr.flush()
    try:
        handler: logging.Handler = _LineHandler(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor (tests)
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UtcFormatter(program))
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
    _LOGGER.propagate = False
    # Our lines carry what they need; the caller lookup and thread/process fields that
    # every LogRecord would otherwise collect cost more than formatting the line.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
