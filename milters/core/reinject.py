"""Handing a message back to the MTA: transformed copies for some recipients, password
notices and review notices go to the re-injection listener (our MTA's, which skips the milters; behind
Postfix, a port with `-o smtpd_milters=`)."""
from __future__ import annotations

import smtplib
import socket
from typing import Iterable, Iterator

from milters.core.errors import MailmoatError


class ReinjectError(MailmoatError):
    """The MTA did not take the message; the caller tempfails the original."""


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _stuffed(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The message as DATA sends it: a leading dot doubled on every line (RFC 5321 4.5.2),
    also where a piece boundary falls inside the CRLF before it."""
    context = b"\r\n"  # the message starts at a line start
    for piece in pieces:
        if not piece:
            continue
        joined = (context + piece).replace(b"\r\n.", b"\r\n..")
        yield joined[len(context):]
        context = (context + piece)[-2:]
    if context != b"\r\n":
        yield b"\r\n"


def reinject(listen: str, mail_from: str, recipients: list[str],
             raw: bytes | Iterable[bytes], timeout: float = 30.0,
             helo: str = "localhost") -> str:
    """Send one message (bytes, or pieces of it with CRLF line ends); returns the MTA's reply
    to the data ("250 ... queued as ID")."""
    host, port = parse_listen(listen)
    try:
        with smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout) as client:
            client.ehlo()
            code, text = client.mail(mail_from)
            if code != 250:
                raise ReinjectError(f"re-injection to {listen}: MAIL FROM got {code} "
                                    f"{text.decode(errors='replace')}")
            for rcpt in recipients:
                code, text = client.rcpt(rcpt)
                if code not in (250, 251):
                    raise ReinjectError(f"re-injection to {listen}: RCPT {rcpt} got {code} "
                                        f"{text.decode(errors='replace')}")
            code, text = client.docmd("DATA")
            if code != 354:
                raise ReinjectError(f"re-injection to {listen}: DATA got {code} "
                                    f"{text.decode(errors='replace')}")
            for piece in _stuffed([raw] if isinstance(raw, bytes) else raw):
                client.send(piece)
            client.send(b".\r\n")
            code, text = client.getreply()
            if code != 250:
                raise ReinjectError(f"re-injection to {listen}: DATA got {code} "
                                    f"{text.decode(errors='replace')}")
            return f"{code} {text.decode(errors='replace')}"
    except (smtplib.SMTPException, OSError, socket.timeout) as exc:
        raise ReinjectError(f"re-injection to {listen} failed: {exc}") from None
