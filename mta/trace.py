"""The Received: trace header an SMTP server must add to what it accepts (RFC 5321 4.4),
written as Postfix writes it, so that the hop can be followed and milters see it too."""
from __future__ import annotations

import time
from email.utils import format_datetime
from datetime import datetime, timezone

_date_cache: tuple[int, str] = (-1, "")  # (second, its RFC 5322 date): one per second


def protocol_name(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848's names: SMTP, ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA (both)."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(*, helo: str | None, client_ip: str, hostname: str, queue_id: str,
                    protocol: str, recipients: list[str], when: datetime | None = None) -> bytes:
    """`Received: from HELO (unknown [IP]) by HOST (mailmoat) with PROTO id ID for <RCPT>;
    DATE` folded over three lines; `for` only when there is one recipient (more would tell
    each recipient who else got the message)."""
    date = format_datetime(when) if when is not None else _date_now()
    address = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    helo_text = _printable(helo or "unknown")
    lines = [f"Received: from {helo_text} (unknown [{address}])",
             f"\tby {hostname} (mailmoat) with {protocol} id {queue_id}"]
    if len(recipients) == 1:
        lines.append(f"\tfor <{_printable(recipients[0])}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def _date_now() -> str:
    """The date for a Received header now; formatted once a second, not once a message
    (email.utils showed up in serve's profile)."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, format_datetime(datetime.fromtimestamp(second, timezone.utc)))
    return _date_cache[1]


def _printable(text: str) -> str:
    """What a client chose (HELO, address) never breaks the header: no control characters."""
    return "".join(ch if ch >= " " and ch != "\x7f" else "?" for ch in text)[:255]
