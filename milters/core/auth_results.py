"""Reading the auth milter's verdicts back from its Authentication-Results header (RFC 8601),
for milters that run after it in their own process (ratelimit's spam points, neutralize).

Only a header whose authserv-id is ours counts: the auth milter deletes incoming ones that
claim our id, so a header with it can only be the auth milter's own (RFC 8601 5).
"""
from __future__ import annotations

import re
from typing import Iterable

HEADER = "Authentication-Results"
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_RESULT = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=\s*([A-Za-z0-9_-]+)")


def strip_comments(text: str) -> str:
    """RFC 5322 comments out (nested ones too); quoted strings are left as they are."""
    while True:
        stripped = _COMMENT.sub(" ", text)
        if stripped == text:
            return text
        text = stripped


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results value (comments and version dropped)."""
    # Comments first: RFC 5322 allows ";" inside them ("(relay; checked) mx.example").
    words = strip_comments(value).split(";", 1)[0].split()
    return words[0].strip('"').lower().rstrip(".") if words else ""


def results_of(value: str) -> list[tuple[str, str]]:
    """(method, result) for each resinfo of one header value, e.g. [("spf", "fail"),
    ("dkim", "pass"), ("dmarc", "fail")]; "none" alone gives []."""
    found = []
    for part in strip_comments(value).split(";")[1:]:
        match = _RESULT.match(part)
        if match:
            found.append((match.group(1).lower(), match.group(2).lower()))
    return found


def trusted_results(headers: Iterable[tuple[str, str]], authserv_id: str
                    ) -> list[tuple[str, str]]:
    """Every (method, result) from the Authentication-Results headers carrying our id."""
    ours = authserv_id.lower().rstrip(".")
    found: list[tuple[str, str]] = []
    for name, value in headers:
        if name.lower() == HEADER.lower() and authserv_id_of(value) == ours:
            found.extend(results_of(value))
    return found


# Results a method can give, best first: a message with one passing DKIM signature and one
# failing one "passes" DKIM for the purposes of a policy condition.
_RANK = ("pass", "policy", "neutral", "none", "softfail", "fail", "temperror", "permerror")


def verdicts(headers: Iterable[tuple[str, str]], authserv_id: str) -> dict[str, str] | None:
    """method -> its best result in our own headers; None when there is no header of ours
    (the auth milter did not run, or skipped the message)."""
    headers = list(headers)
    ours = authserv_id.lower().rstrip(".")
    if not any(name.lower() == HEADER.lower() and authserv_id_of(value) == ours
               for name, value in headers):
        return None
    best: dict[str, str] = {}
    for method, result in trusted_results(headers, authserv_id):
        known = best.get(method)
        rank = _RANK.index(result) if result in _RANK else len(_RANK)
        if known is None or rank < (_RANK.index(known) if known in _RANK else len(_RANK)):
            best[method] = result
    return best


def dmarc_domain(headers: Iterable[tuple[str, str]], authserv_id: str) -> str | None:
    """The From domain our DMARC result is about (its header.from property)."""
    ours = authserv_id.lower().rstrip(".")
    for name, value in headers:
        if name.lower() != HEADER.lower() or authserv_id_of(value) != ours:
            continue
        for part in strip_comments(value).split(";")[1:]:
            if _RESULT.match(part) and part.strip().lower().startswith("dmarc"):
                found = re.search(r"header\.from\s*=\s*([^\s;]+)", part, re.IGNORECASE)
                if found:
                    return found.group(1).strip('"').lower().rstrip(".")
    return None
