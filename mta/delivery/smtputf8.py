"""RFC 6531/6532 on the way out: does a queued message need a next hop with SMTPUTF8?

smtpd records a MAIL FROM ... SMTPUTF8 in the envelope (`extra["smtputf8"]`). As Postfix
does, delivery then sends SMTPUTF8 to a next hop that offers it; to one that does not, a
message that really needs it (a non-ASCII envelope address or header) bounces with 5.6.7,
and one that only asked for it (all ASCII) goes out without it. A non-ASCII address needs
SMTPUTF8 whatever was asked: it cannot be sent any other way.
"""
from __future__ import annotations

from mta.queue.spool import Envelope, StoredMessage

REQUESTED = "smtputf8"  # the envelope's extra key, "yes" when MAIL carried SMTPUTF8
BLOCK = 64 * 1024


def requested(envelope: Envelope) -> bool:
    return envelope.extra.get(REQUESTED) == "yes" or not all_ascii(
        envelope.sender, *(r.address for r in envelope.recipients))


def all_ascii(*texts: str) -> bool:
    return all(text.isascii() for text in texts)


def header_is_ascii(message: StoredMessage) -> bool:
    """Whether the header section (up to the first empty line) is 7-bit; read in blocks,
    never the whole message."""
    tail = b""
    with open(message.path, "rb") as source:
        left = message.size
        while left > 0:
            block = source.read(min(left, BLOCK))
            if not block:
                break
            left -= len(block)
            window = tail + block
            end = min((at for at in (window.find(b"\r\n\r\n"), window.find(b"\n\n"))
                       if at >= 0), default=-1)
            if not (window[:end] if end >= 0 else window).isascii():
                return False
            if end >= 0:
                return True
            tail = window[-3:]
    return True


def needed(sender: str, recipients: list[str], message: StoredMessage) -> bool:
    """Whether the message cannot be delivered without SMTPUTF8 (Postfix's test)."""
    return not all_ascii(sender, *recipients) or not header_is_ascii(message)
