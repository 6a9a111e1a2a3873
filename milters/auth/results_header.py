"""The RFC 8601 Authentication-Results header: writing ours, recognising forged ones.

Later milters (neutralize, ratelimit) decide on this header, so they must only ever see one
that we wrote: every incoming Authentication-Results that names our authserv-id is a forgery
(or a leftover from a loop) and is removed; those of other ADMDs stay (RFC 8601 5). What we
write reads back, with milters.core.auth_results, as exactly what we decided: every value
the client chose goes through encode_value, every comment through comment().
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from milters.core.auth_results import HEADER, encode_value, is_ours

from .dkim_check import ArcResult, DkimResult, plain
from .dmarc import DmarcResult
from .spf import SpfResult

COMMENT_LIMIT = 160  # characters of a comment; it is for humans, the results say the rest
_VALUE_LIMIT = 800  # characters of one encoded value: a header line must stay under 998
_FOLD_AT = 76


def comment(text: str, limit: int = COMMENT_LIMIT) -> str:
    """` (text)` for an RFC 5322 comment, or "" for no text: one line of printable ASCII
    (other characters become "?"), Python byte reprs unwrapped, "(", ")" and "\\" escaped
    as quoted-pairs, and a long text shortened at a word boundary with "..."."""
    text = plain(text)
    text = re.sub(r"[\x00-\x20\x7f]+", " ", text)
    text = "".join(c if c.isascii() else "?" for c in text).strip()
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit - 2)
        # A single word longer than half the limit is the only thing ever cut inside.
        text = (text[:cut] if cut > limit // 2 else text[:limit - 3]).rstrip(" ,;:") + "..."
    escaped = re.sub(r"([()\\])", r"\\\1", text)
    return f" ({escaped})" if escaped else ""


def _fit(value: str) -> str:
    """A value short enough to keep its line under RFC 5322's 998 characters once encoded
    (a domain has at most 253; only hostile input is ever shortened)."""
    while len(encode_value(value)) > _VALUE_LIMIT:
        value = value[:len(value) * 3 // 4]
    return value


def resinfo(method: str, result: str, note: str, properties: list[tuple[str, str]]) -> str:
    """One `method=result (note) ptype.property=value ...`, folded between properties."""
    text = f"{method}={result}{comment(note)}"
    width = len(text) + 8
    for name, value in properties:
        item = f"{name}={encode_value(_fit(value))}"
        if width + 1 + len(item) > _FOLD_AT:
            text += "\n\t  " + item
            width = 10 + len(item)
        else:
            text += " " + item
            width += 1 + len(item)
    return text


# No real Authentication-Results comes near this. A longer one is cut somewhere on its way
# (a milter packet holds 64 KB, Postfix's header_size_limit keeps 100 KB, our MIME reading
# as much), so our id could hide past the cut of one reader and be seen by the next.
UNREADABLE_LENGTH = 16 * 1024


def forged_indexes(headers: list[tuple[str, str]], authserv_id: str) -> list[int]:
    """1-based positions, among Authentication-Results headers, of those carrying our
    authserv-id (the index chgheader wants), and of those too long to be read whole by
    every reader: deleted as if forged (fail closed), since their id cannot be known."""
    found, position = [], 0
    for name, value in headers:
        if name.lower() == HEADER.lower():
            position += 1
            if len(value) > UNREADABLE_LENGTH or is_ours(value, authserv_id):
                found.append(position)
    return found


@dataclass(frozen=True)
class AuthResults:
    spf: SpfResult | None  # the MAIL FROM identity (the HELO one for a null sender)
    helo: SpfResult | None  # the HELO identity checked on its own
    dkim: list[DkimResult]
    arc: ArcResult | None
    dmarc: DmarcResult | None  # the result that decided (the strictest, RFC 7489 6.6.1)
    dmarc_each: tuple[DmarcResult, ...] = ()  # one per author domain, when there are several

    @property
    def dmarc_results(self) -> tuple[DmarcResult, ...]:
        return self.dmarc_each or ((self.dmarc,) if self.dmarc is not None else ())


def _spf(result: SpfResult) -> str:
    identity = "smtp.mailfrom" if result.identity == "mailfrom" else "smtp.helo"
    # The identity is always written, empty or not: a reader tells MAIL FROM from HELO by it.
    return resinfo("spf", result.result, result.explanation, [(identity, result.domain)])


def _dkim(sig: DkimResult) -> str:
    # RFC 8601 2.7.1 / RFC 6008: d=, s= and the start of b= tell signatures apart; a tag the
    # signature lacks is left out rather than written as an empty string.
    props = [(name, value) for name, value in (("header.d", sig.domain),
                                                ("header.s", sig.selector),
                                                ("header.b", sig.header_b)) if value]
    return resinfo("dkim", sig.result, f"{sig.algorithm} {sig.reason}".strip(), props)


def _dmarc(d: DmarcResult) -> str:
    detail = f"p={d.policy} dis={d.disposition.upper()}" if d.record else d.reason
    return resinfo("dmarc", d.result, detail, [("header.from", d.domain)] if d.domain else [])


def compose(authserv_id: str, results: AuthResults) -> str:
    """The header value, one result per folded line (RFC 8601 2.2 syntax)."""
    parts: list[str] = []
    if results.spf is not None:
        parts.append(_spf(results.spf))
    if results.helo is not None and results.spf is not None \
            and results.spf.identity == "mailfrom":
        parts.append(_spf(results.helo))
    parts.extend(_dkim(sig) for sig in results.dkim)
    if not results.dkim:
        parts.append("dkim=none")
    if results.arc is not None:
        sealers = f"sealed by {', '.join(results.arc.sealers)}" if results.arc.sealers else ""
        parts.append(resinfo("arc", results.arc.result, sealers, []))
    parts.extend(_dmarc(d) for d in results.dmarc_results)
    # Folded with a bare LF, as libmilter's smfi_addheader wants (Postfix and our MTA both
    # write the line ends as CRLF on the wire).
    return authserv_id + ";\n\t" + ";\n\t".join(parts)
