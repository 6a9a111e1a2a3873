"""The directory name of a recipient's Maildir: a local part never becomes a path.

The address is lower-cased and its domain put in its A-label form (one mailbox per canonical
address); then every byte outside `a-z 0-9 @ . + - _ =` is written as %XX (UTF-8, so
`日本@example.jp` becomes `%E6%97%A5%E6%9C%AC@example.jp`), and so is a leading dot. The
name is therefore one path component that is never `.`, `..` or hidden, holds no `/`, `\\`,
NUL or control character, and `urllib.parse.unquote` gives the address back.

A name longer than a file name may be (255 bytes) keeps its first 190 bytes and ends with
`~` and the SHA-256 of the whole name: `~` never occurs in an encoded name, so these stay
apart from every other mailbox and one address always lands in the same one.
"""
from __future__ import annotations

import hashlib
import re

from milters.core.policy.matching import normalize_domain

NAME_MAX = 255  # bytes in one file name (Linux, most file systems)
KEPT = 190
_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789@.+-_=")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def mailbox_name(address: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    canonical = local.lower() + (at + normalize_domain(domain) if at else "")
    raw = canonical.encode("utf-8", "surrogateescape")  # bytes smtpd could not decode stay
    name = "".join(chr(b) if b in _SAFE and not (i == 0 and b == ord(".")) else f"%{b:02X}"
                   for i, b in enumerate(raw))
    if len(name) > NAME_MAX:
        name = name[:KEPT] + "~" + hashlib.sha256(name.encode()).hexdigest()
    return name


def header_text(address: str) -> str:
    """An address as it may stand in a header we write: control characters (a CR LF that
    would start a header of its own) as %XX; other text is unchanged."""
    return _CONTROL.sub(lambda found: f"%{ord(found.group()):02X}", address)
