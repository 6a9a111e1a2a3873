"""The RFC 8601 Authentication-Results header: writing ours, recognising forged ones.

Later milters (neutralize) decide on this header, so they must only ever see one that we
wrote: every incoming Authentication-Results that names our authserv-id is a forgery (or a
leftover from a loop) and is removed; those of other ADMDs stay (RFC 8601 5).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from milters.core.auth_results import HEADER, authserv_id_of

from .dkim_check import ArcResult, DkimResult
from .dmarc import DmarcResult
from .spf import SpfResult

# RFC 8601 2.2: a property value is a token (RFC 2045: no "/" or "=", so base64 often is
# not one), an address or a quoted string; anything that is not plainly one gets quoted.
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~@]+$")


def _value(text: str) -> str:
    if text and _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    cleaned = re.sub(r"[()\\\r\n]", " ", text).strip()
    return f" ({cleaned[:120]})" if cleaned else ""


def forged_indexes(headers: list[tuple[str, str]], authserv_id: str) -> list[int]:
    """1-based positions, among Authentication-Results headers, of those carrying our
    authserv-id (the index chgheader wants)."""
    ours = authserv_id.lower().rstrip(".")
    found, position = [], 0
    for name, value in headers:
        if name.lower() == HEADER.lower():
            position += 1
            if authserv_id_of(value) == ours:
                found.append(position)
    return found


@dataclass(frozen=True)
class AuthResults:
    spf: SpfResult | None
    helo: SpfResult | None
    dkim: list[DkimResult]
    arc: ArcResult | None
    dmarc: DmarcResult | None


def compose(authserv_id: str, results: AuthResults) -> str:
    """The header value, one method per folded line (RFC 8601 2.2 syntax)."""
    parts: list[str] = []
    if results.spf is not None:
        prop = "smtp.mailfrom" if results.spf.identity == "mailfrom" else "smtp.helo"
        parts.append(f"spf={results.spf.result}{_comment(results.spf.explanation)} "
                     f"{prop}={_value(results.spf.domain)}")
    if results.helo is not None and results.spf is not None \
            and results.spf.identity == "mailfrom":
        parts.append(f"spf={results.helo.result} smtp.helo={_value(results.helo.domain)}")
    if results.dkim:
        for sig in results.dkim:
            detail = _comment(f"{sig.algorithm} {sig.reason}".strip())
            parts.append(f"dkim={sig.result}{detail} header.d={_value(sig.domain or 'unknown')}"
                         f" header.s={_value(sig.selector or 'unknown')}"
                         f" header.b={_value(sig.header_b or 'none')}")
    else:
        parts.append("dkim=none")
    if results.arc is not None:
        sealers = f" (sealed by {', '.join(results.arc.sealers)})" if results.arc.sealers else ""
        parts.append(f"arc={results.arc.result}{sealers}")
    if results.dmarc is not None:
        d = results.dmarc
        detail = f"p={d.policy} dis={d.disposition.upper()}" if d.record else d.reason
        from_part = f" header.from={_value(d.domain)}" if d.domain else ""
        parts.append(f"dmarc={d.result}{_comment(detail)}{from_part}")
    # Folded with a bare LF, as libmilter's smfi_addheader wants (Postfix and our MTA both
    # write the line ends as CRLF on the wire).
    return authserv_id + ";\n\t" + ";\n\t".join(parts)
