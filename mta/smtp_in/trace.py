"""The Received: trace header an SMTP server must add to what it accepts (RFC 5321 4.4),
written as Postfix writes it, so that the hop can be followed and milters see it too."""
from __future__ import annotations

import time
import unicodedata
from email.utils import format_datetime
from datetime import datetime, timezone

from milters.core.policy.matching import normalize_domain

HOSTNAME_LIMIT = 255  # octets of a host name we repeat (Postfix's VALID_HOSTNAME_LEN)
# Characters that must never reach a header: C0 and C1 controls with DEL (Cc), the
# surrogates that stand for bytes that were not UTF-8 (Cs), Unicode line and paragraph
# separators (Zl, Zp), and invisible format characters such as bidi overrides (Cf).
_UNSAFE = frozenset({"Cc", "Cs", "Zl", "Zp", "Cf"})

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
    helo_text = header_hostname(helo or "unknown")
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
    """What a client chose (an address) never breaks the header: anything unsafe is '?'.
    Valid UTF-8 stays: an SMTPUTF8 message may carry it in its header (RFC 6532)."""
    return "".join("?" if unicodedata.category(ch) in _UNSAFE else ch
                   for ch in text[:HOSTNAME_LIMIT])


def header_hostname(name: str) -> str:
    """A client's HELO name as we repeat it (Received, the milters, our logs): one word of
    printable ASCII, at most 255 characters. A valid internationalised name becomes its
    A-label; anything else outside '!'..'~' (controls, bytes that were not UTF-8, spaces
    that would split it into two words) becomes '?', as Postfix's printable() does."""
    name = name[:HOSTNAME_LIMIT]
    if not name.isascii():
        encoded = normalize_domain(name)
        if encoded.isascii() and encoded:
            name = encoded
    return "".join(ch if "!" <= ch <= "~" else "?" for ch in name)[:HOSTNAME_LIMIT] or "?"
