"""The auth milter's Authentication-Results header (RFC 8601) as later milters read it
(ratelimit's spam points, neutralize), and the value encoding both sides share.

Only a header whose authserv-id is ours counts: the auth milter deletes incoming ones that
claim our id, so a header with it can only be the auth milter's own (RFC 8601 5). Its values
(HELO, MAIL FROM and From domains, DKIM tags) come from the client, so it is read with a real
RFC 8601 parser (authres), never by splitting text, and anything in a header of ours that
does not read exactly as the auth milter writes it fails closed: no trusted verdict at all.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable
from urllib.parse import unquote_to_bytes

import authres
import authres.arc
import authres.core
import authres.dmarc

from .errors import AuthResultsError
from .eventlog import log_event

HEADER = "Authentication-Results"

# The methods a policy condition (`auth: {...}`) names. `spf` is the MAIL FROM identity's
# result, as RFC 7489 uses it; `spf_helo` is the separate HELO check (RFC 7208 2.3).
POLICY_METHODS = ("spf", "spf_helo", "dkim", "dmarc", "arc")
# What RFC 8601 2.7 (and RFC 8617 for arc) lets each method say.
RESULTS = {
    "spf": ("pass", "fail", "softfail", "neutral", "none", "policy", "temperror", "permerror"),
    "dkim": ("pass", "fail", "policy", "neutral", "none", "temperror", "permerror"),
    "dmarc": ("pass", "fail", "none", "temperror", "permerror"),
    # The auth milter writes temperror/permerror for a chain it could not check (a DNS
    # timeout on a seal's key): read, or every later milter would lose every verdict.
    "arc": ("pass", "fail", "none", "temperror", "permerror"),
}
# DKIM, best first: one passing signature makes the message "pass" DKIM.
_DKIM_BEST_FIRST = ("pass", "policy", "neutral", "none", "fail", "temperror", "permerror")
# DMARC with several author domains (RFC 7489 6.6.1), worst first: one failing domain is
# what the message is.
_DMARC_WORST_FIRST = ("fail", "permerror", "temperror", "none", "pass")
# Far above anything the auth milter writes; the parser is quadratic in the text length.
MAX_LENGTH = 65536

# -- values -----------------------------------------------------------------------------------
# RFC 2045 5.1 token characters less "%", which starts our escapes.
_TOKEN = re.compile(r"[A-Za-z0-9!#$&'*+.^_`{|}~-]+")
# Percent-escaped: "%" itself and whatever a quoted-string cannot hold (CTLs, CR, LF, TAB,
# non-ASCII), as the UTF-8 bytes of the character.
_UNSAFE = re.compile(r"[^\x20-\x24\x26-\x7e]")
_QUOTED_PAIR = re.compile(r"\\([\t \x21-\x7e])")


def encode_value(text: str) -> str:
    """A property value (RFC 8601 2.2 pvalue) that reads back as exactly `text`: a token
    when it is one, else a quoted-string; characters neither can hold are %XX-escaped."""
    escaped = _UNSAFE.sub(lambda m: "".join(
        f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass")), text)
    if _TOKEN.fullmatch(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def decode_value(text: str) -> str:
    """The inverse of encode_value, after the parser took off quotes and quoted-pairs."""
    try:
        return unquote_to_bytes(text).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise AuthResultsError(f"a property value is not UTF-8 once unescaped: {exc}") from None


# -- the parser -------------------------------------------------------------------------------
class _Grammar(authres.core.AuthenticationResultsHeader):
    """authres's RFC 8601 grammar, strict (a property it cannot read is an error, where the
    default skips it), with one repair: authres 1.2 reads a quoted-string pvalue only when a
    ";" or the end follows it, so `header.s="a b" header.b=x` loses header.s. RFC 8601 2.2
    lets another propspec follow; this reads it so, and takes the quoted-pairs off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strict = True

    def _parse_pvalue(self) -> str | None:
        self._parse_rfc5322_cfws()
        if self._parse_text.startswith('"'):
            quoted = self._parse_rfc5322_quoted_string() or ""
            if self._parse_pattern(r"@"):  # "local part"@domain (RFC 8601 2.2)
                domain = self._parse_rfc5322_dot_atom()
                if not domain:
                    raise authres.SyntaxError("Expected a domain after @", self._parse_text)
                return f'"{quoted}"@{domain}'
            return _QUOTED_PAIR.sub(r"\1", quoted)
        match = self._parse_pattern(r"%s+" % authres.core.PTEXT_PATTERN)
        self._parse_rfc5322_cfws()
        return match.group() if match else None


_FEATURES = authres.FeatureContext(authres.dmarc, authres.arc,
                                   SimpleNamespace(AuthenticationResultsHeader=_Grammar))


@dataclass(frozen=True)
class ResInfo:
    method: str
    result: str
    properties: tuple[tuple[str, str], ...] = ()  # ("smtp.mailfrom", decoded value), in order

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.properties if key == name]


def unfold(value: str) -> str:
    """RFC 5322 2.2.3: a line break followed by white space is folding."""
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def parse(value: str) -> tuple[str, list[ResInfo]]:
    """The authserv-id and every resinfo of one header value (AuthResultsError if it is not
    RFC 8601, including a line break that is not folding and raw non-ASCII)."""
    if len(value) > MAX_LENGTH:
        raise AuthResultsError(f"header of {len(value)} characters (limit {MAX_LENGTH})")
    text = unfold(value)
    if "\r" in text or "\n" in text or not text.isascii() or "\x00" in text:
        raise AuthResultsError("a bare line break, NUL or non-ASCII character")
    try:
        header = _FEATURES.parse_value(text)
    except (authres.AuthResError, RecursionError, ValueError, TypeError, AttributeError,
            IndexError) as exc:
        raise AuthResultsError(f"not RFC 8601: {exc}") from None
    results = [ResInfo(str(r.method).lower(), str(r.result or "").lower(),
                       tuple((f"{p.type}.{p.name}", decode_value(p.value or ""))
                             for p in r.properties))
               for r in header.results]
    return str(header.authserv_id), results


# -- whose header -----------------------------------------------------------------------------
def _normal(authserv_id: str) -> str:
    return authserv_id.strip().lower().rstrip(".")


def authserv_id_of(value: str) -> str:
    """The authserv-id as any reader might take it: comments (nested, with quoted-pairs) and
    folding dropped, quotes and escapes taken off, case and a root dot ignored. Lenient on
    purpose (it decides which headers we delete and distrust), and linear in the length: a
    megabyte of "(((" costs one pass."""
    out: list[str] = []
    depth, i = 0, 0
    while i < len(value):
        char = value[i]
        if char == "\\":
            if depth == 0:
                out.append(value[i + 1:i + 2])
            i += 2
            continue
        if char == "(":
            depth += 1
            out.append(" ")  # a comment separates words: "mx.example(c)1" is id "mx.example"
        elif char == ")" and depth:
            depth -= 1
        elif depth == 0:
            if char == ";":
                break
            out.append(char)
        i += 1
    words = "".join(out).split()
    return _normal(words[0].strip('"')) if words else ""


def is_ours(value: str, authserv_id: str) -> bool:
    """Whether a header value claims our authserv-id, by the lenient reading or by the
    parser's (a header either would call ours is ours)."""
    ours = _normal(authserv_id)
    if authserv_id_of(value) == ours:
        return True
    if len(value) > 8192:  # the lenient reading covers long ones; the parser is quadratic
        return False
    try:
        return _normal(parse(value)[0]) == ours
    except AuthResultsError:
        return False


# -- what the auth milter decided -------------------------------------------------------------
@dataclass(frozen=True)
class Verdicts:
    methods: dict[str, str]  # policy method (POLICY_METHODS) -> result
    signals: tuple[tuple[str, str], ...]  # (method, result) per resinfo, spf_helo apart
    dmarc_domains: tuple[str, ...]  # header.from of each DMARC result ("" for none)
    unreadable: str = ""  # why a header of ours was not trusted ("": it was)

    @property
    def dmarc_domain(self) -> str | None:
        """The one From domain DMARC judged; None with none or several (no single domain
        can vouch for a message with several authors)."""
        if len(self.dmarc_domains) != 1 or not self.dmarc_domains[0]:
            return None
        return self.dmarc_domains[0]


def _interpret(resinfos: list[ResInfo]) -> Verdicts:
    """The verdicts in one header of ours; AuthResultsError for anything the auth milter
    does not write (an unknown method or result, an SPF result naming no identity or two)."""
    signals: list[tuple[str, str]] = []
    spf: dict[str, str] = {}
    dkim: list[str] = []
    dmarc: list[str] = []
    domains: list[str] = []
    arc: list[str] = []
    for info in resinfos:
        if info.result not in RESULTS.get(info.method, ()):
            raise AuthResultsError(f"{info.method}={info.result} is not a result we write")
        if info.method == "spf":
            identities = [k for k, _ in info.properties if k in ("smtp.mailfrom", "smtp.helo")]
            if len(identities) != 1 or identities[0] in spf:
                raise AuthResultsError("an spf result must name exactly one identity, once")
            spf[identities[0]] = info.result
            signals.append(("spf" if identities[0] == "smtp.mailfrom" else "spf_helo",
                            info.result))
            continue
        signals.append((info.method, info.result))
        if info.method == "dkim":
            dkim.append(info.result)
        elif info.method == "dmarc":
            dmarc.append(info.result)
            named = info.values("header.from")
            if len(named) > 1:
                raise AuthResultsError("a dmarc result names header.from twice")
            domains.append(named[0] if named else "")
        else:
            arc.append(info.result)
    if len(arc) > 1:
        raise AuthResultsError("more than one arc result")
    methods: dict[str, str] = {}
    # RFC 7208 2.4: with a null MAIL FROM, the HELO identity is the MAIL FROM identity.
    if "smtp.mailfrom" in spf or "smtp.helo" in spf:
        methods["spf"] = spf.get("smtp.mailfrom", spf.get("smtp.helo", "none"))
    if "smtp.helo" in spf:
        methods["spf_helo"] = spf["smtp.helo"]
    if "smtp.helo" in spf and "smtp.mailfrom" not in spf:
        signals.append(("spf", spf["smtp.helo"]))
    if dkim:
        methods["dkim"] = min(dkim, key=_DKIM_BEST_FIRST.index)
    if dmarc:
        methods["dmarc"] = min(dmarc, key=_DMARC_WORST_FIRST.index)
    if arc:
        methods["arc"] = arc[0]
    return Verdicts(methods, tuple(signals), tuple(d.lower().rstrip(".") for d in domains))


def read(headers: Iterable[tuple[str, str]], authserv_id: str) -> Verdicts | None:
    """The verdicts of our own header; None when there is none (the auth milter did not run,
    or skipped the message). A header of ours that cannot be read gives empty verdicts with
    `unreadable` set: fail closed, never a pass."""
    ours = [value for name, value in headers
            if name.lower() == HEADER.lower() and is_ours(value, authserv_id)]
    if not ours:
        return None
    try:
        # The auth milter writes one; should there be more, they are read as one list, so
        # a method written twice (two spf results for MAIL FROM) is still an error.
        resinfos: list[ResInfo] = []
        for value in ours:
            found_id, found = parse(value)
            if _normal(found_id) != _normal(authserv_id):
                raise AuthResultsError(f"authserv-id reads as {found_id!r}")
            resinfos.extend(found)
        return _interpret(resinfos)
    except AuthResultsError as exc:
        log_event("auth_results_unreadable", level=logging.WARNING, authserv_id=authserv_id,
                  reason=str(exc))
        return Verdicts({}, (), (), unreadable=str(exc))


def verdicts(headers: Iterable[tuple[str, str]], authserv_id: str) -> dict[str, str] | None:
    """Policy method -> result from our own header (see read); a method not checked is
    absent (policy conditions read it as "none")."""
    found = read(headers, authserv_id)
    return None if found is None else found.methods


def trusted_results(headers: Iterable[tuple[str, str]], authserv_id: str
                    ) -> list[tuple[str, str]]:
    """Every (method, result) in our own header, one per result it holds (three DKIM
    signatures: three), the HELO check as spf_helo."""
    found = read(headers, authserv_id)
    return [] if found is None else list(found.signals)


def dmarc_domain(headers: Iterable[tuple[str, str]], authserv_id: str) -> str | None:
    """The From domain our DMARC result is about; None unless there is exactly one (several
    author domains: no single domain can vouch for the message)."""
    found = read(headers, authserv_id)
    return None if found is None else found.dmarc_domain
