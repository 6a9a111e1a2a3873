"""One key=value line per event, like Postfix's logs, so `grep ID` tells a message's story.

    2026-11-28T20:41:26Z mailmoat/ratelimit[1234]: event=tempfail queue_id=4F2A1 ip=192.0.2.7 points=12.5

Values with spaces, quotes or '=' are double-quoted with backslash escapes; None values are left out.

`gateway.log` chooses the form and the place (LogSettings): `format: json` writes one JSON
object per line with the same keys (plus time, program, pid and level), for log shippers
that parse JSON; `to: syslog` sends the lines to the local syslog socket (/dev/log, or
$MAILMOAT_SYSLOG_SOCKET) with facility mail, as Postfix does, tagged `mailmoat/PROGRAM`.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from .errors import MailmoatError

_LOGGER = logging.getLogger("mailmoat")
_SAFE = re.compile(r"[a-zA-Z0-9._\-:/@\[\]+,<>]+")  # values written without quotes
LOG_FORMATS = ("keyvalue", "json")
LOG_TARGETS = ("stderr", "syslog")
SYSLOG_SOCKET = "/dev/log"
SYSLOG_SOCKET_ENV = "MAILMOAT_SYSLOG_SOCKET"  # another socket (tests, chroots)


@dataclass(frozen=True)
class LogSettings:
    """gateway.log: the form of each line and where it goes."""

    format: str = "keyvalue"  # keyvalue | json
    to: str = "stderr"  # stderr | syslog


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


class _Event:
    """A log record's message: formatted as key=value only when a handler asks (str), so
    the JSON formatter can read the fields themselves."""

    __slots__ = ("event", "fields")

    def __init__(self, event: str, fields: dict[str, Any]) -> None:
        self.event, self.fields = event, fields

    def __str__(self) -> str:
        return format_event(self.event, self.fields)


def log_event(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event; pass queue_id=... whenever the message has one."""
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, _Event(event, fields))


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's event and fields (a line not made by log_event: event=message)."""
    message = record.msg
    if isinstance(message, _Event):
        fields = {"event": message.event}
        fields.update((k, _json_value(v)) for k, v in message.fields.items() if v is not None)
        return fields
    return {"event": "message", "text": record.getMessage()}


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


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, program (with the PID, as the syslog tag), level,
    then the event's own keys. A field named like one of the first three is kept as
    event_NAME: a value from a message can never pass for the line's own."""

    def __init__(self, program: str, *, stamp: bool = True) -> None:
        super().__init__()
        self._program = f"mailmoat/{program}[{os.getpid()}]"
        self._stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {}
        if self._stamp:  # syslog stamps its own lines
            line["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        line["program"] = self._program
        line["level"] = record.levelname.lower()
        for key, value in event_fields(record).items():
            line[f"event_{key}" if key in _HEAD else key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


_HEAD = frozenset(("time", "program", "level", "exception"))


class _SyslogFormatter(logging.Formatter):
    """`mailmoat/PROGRAM[PID]: message`, syslog's tag form; the daemon adds time and host."""

    def __init__(self, program: str) -> None:
        super().__init__()
        self._tag = f"mailmoat/{program}[{os.getpid()}]: "

    def format(self, record: logging.LogRecord) -> str:
        return self._tag + record.getMessage()


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


def syslog_socket() -> str:
    return os.environ.get(SYSLOG_SOCKET_ENV) or SYSLOG_SOCKET


def make_handler(program: str, settings: LogSettings, fd: int | None = None
                 ) -> logging.Handler:
    """The handler `settings` asks for: lines to `fd` (stderr when None) or to syslog.
    MailmoatError when the syslog socket cannot be reached (no syslog daemon)."""
    if settings.to == "syslog":
        address = syslog_socket()
        try:
            # SysLogHandler, like openlog(3), ignores a socket nobody listens on: find out
            # now, at start, rather than lose every line.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                probe.connect(address)
            handler: logging.Handler = logging.handlers.SysLogHandler(
                address, facility=logging.handlers.SysLogHandler.LOG_MAIL,
                socktype=socket.SOCK_DGRAM)
        except OSError as exc:
            raise MailmoatError(f"gateway.log.to: syslog: cannot reach {address}: "
                                f"{exc.strerror or exc} (is a syslog daemon running?)"
                                ) from None
        handler.setFormatter(_JsonFormatter(program, stamp=False)
                             if settings.format == "json" else _SyslogFormatter(program))
        return handler
    try:
        handler = _LineHandler(sys.stderr.fileno() if fd is None else fd)
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor (tests)
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter(program) if settings.format == "json"
                         else _UtcFormatter(program))
    return handler


def setup_logging(program: str, *, verbose: bool = False,
                  settings: LogSettings | None = None) -> None:
    """Send mailmoat's event lines to stderr (systemd/journald or the caller collects them),
    or where gateway.log says (called again once the config is read)."""
    sys.stderr.flush()
    handler = make_handler(program, settings or LogSettings())
    for old in _LOGGER.handlers:
        old.close()
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
    _LOGGER.propagate = False
    # Our lines carry what they need; the caller lookup and thread/process fields that
    # every LogRecord would otherwise collect cost more than formatting the line.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
