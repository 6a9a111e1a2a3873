"""Links made harmless in text: `https://example.com/x` becomes `hxxps://example[.]com/x`,
which a mail client no longer turns into a link but a reader can still see and judge.

A URL can carry others: a redirector's `?u=http://evil.example/x`, the same percent-encoded
(`?u=http%3A%2F%2Fevil.example`), a path holding a whole URL. Clients link the inner one
too (they look for "scheme://" anywhere, and a redirector decodes the query), so the part
after the host is read again, percent-decoding undone, and every URL in it defanged the
same way, to any depth (bounded). `mailto:` addresses stay readable and linked (a client
links a bare address anyway, and a reply must stay possible); only URLs they carry in
`?body=` are defanged.

Also the classic lures are named so the note can warn about them: a URL whose user-info
hides the real host (`https://bank.example@evil.example/`), punycode or non-ASCII host
names (look-alike letters), and link text that shows one domain over a link to another.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote, unquote, urlsplit

# A URL in running text: any scheme with "//", a bare "www." host, a mailto: address. A
# scheme starts where a word does (a run of scheme letters is looked into once, not from
# each of its letters: linear time on a megabyte without spaces); a scheme glued to a word
# ("xhttp://") is some other scheme, broken all the same. Text ends at whitespace, quotes
# and angle brackets; trailing punctuation is trimmed below.
# A word also starts after a percent escape ("%20www.a.example" decodes to two words).
_START = r"(?:(?<![a-z0-9+.-])|(?<=%[0-9a-f]{2}))"
_WWW_START = r"(?:(?<![a-z0-9.-])|(?<=%[0-9a-f]{2}))"  # "+www.a.example" is linked
_URL = re.compile(rf"""(?i)(?:{_START}(?:[a-z][a-z0-9+.-]{{0,31}}://|mailto:)"""
                  rf"""|{_WWW_START}www\.)[^\s<>"'\u3000-\u303f]+""")
_SCHEME = re.compile(r"(?i)([a-z][a-z0-9+.-]*)://")
_COLON_SLASHES = re.compile(r"://")
_SCHEME_BEFORE = re.compile(r"(?i)[a-z][a-z0-9+.-]*\Z")
# A whole word (from its start only: linear time), looked into when it holds a "%".
_WORD = re.compile(r"""(?<![^\s<>"'\u3000-\u303f])[^\s<>"'\u3000-\u303f]+""")
_WWW_LEFT = re.compile(rf"(?i){_WWW_START}www\.(?=[^\s.\[]+\.)")
# User-info (up to the last "@" before any "/?#"), a host (a bracketed IPv6 address or a
# name), a port.
_AUTHORITY = re.compile(r"(?:[^/?#@\s]*@)?(?:\[[^\]/?#]*\]|[^/?#:@\s;=,!$&'()*+]*)(?::\d*)?")
_TRAILING = ".,;:!?)]}'\u3001\u3002"
_SCHEMES = {"http": "hxxp", "https": "hxxps", "ftp": "fxp"}
DEFANGED_SCHEMES = frozenset(_SCHEMES.values())
_MAX_DECODE = 5  # rounds of percent-decoding (double-encoded redirects are common)
_MAX_NESTING = 20  # URLs inside URLs: deeper ones are defanged as text, not parsed again
# Characters a decoded inner URL may hold that would end the URL token in text.
_REQUOTE = re.compile(r"""[\s<>"'\x00-\x1f\x7f]""")
# A domain shown in link text: two or more labels, the last alphabetic (example.com).
_SHOWN_DOMAIN = re.compile(r"(?i)(?<![\w.@-])((?:[a-z0-9\u00a1-\uffff-]+\.)+"
                           r"[a-z\u00a1-\uffff]{2,63})(?![\w-])")


@dataclass
class LinkReport:
    """What was done to the links of one message, for the note and the log."""

    defanged: int = 0
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        if text not in self.warnings and len(self.warnings) < 50:
            self.warnings.append(text)


def _split_trailing(url: str) -> tuple[str, str]:
    """A URL without the sentence punctuation after it; a ")" stays when "(" is inside."""
    end = len(url)
    while end and url[end - 1] in _TRAILING:
        if url[end - 1] == ")" and url[:end].count("(") >= url[:end].count(")"):
            break
        end -= 1
    return url[:end], url[end:]


def host_of(url: str) -> str:
    """The host a URL really leads to (after any user-info), lowercased; "" if none."""
    if url.lower().startswith("www."):
        url = "http://" + url
    try:
        return (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:
        return ""


def _scheme_broken(scheme: str) -> str:
    """hxxp, hxxps, fxp for the web; any other scheme keeps its name and loses its colon
    ("smb[:]//"): no client links that, and a reader still sees what it was."""
    lowered = scheme.lower()
    if lowered in _SCHEMES or lowered in DEFANGED_SCHEMES:
        return _SCHEMES.get(lowered, lowered) + "://"
    return scheme + "[:]//"


def defang(url: str, report: LinkReport | None = None, depth: int = 0) -> str:
    """hxxps://example[.]com/path: the scheme broken, the host's dots bracketed, and every
    URL carried after the host (literal or percent-encoded) defanged too (counted in
    `report`)."""
    # The scheme only where the URL starts with one: "www.a.example?u=http://b.example"
    # has its "://" in the query.
    scheme = _SCHEME.match(url)
    head = _scheme_broken(scheme.group(1)) if scheme else ""
    authority, tail = _split_authority(url[scheme.end():] if scheme else url)
    authority = authority.replace(".", "[.]").replace("@", "[@]")
    done = head + authority + defang_nested(tail, report or LinkReport(), depth + 1)
    return _leftovers(done, report or LinkReport()) if depth == 0 else done


def _split_authority(rest: str) -> tuple[str, str]:
    """(host part, everything after it) of what follows "scheme://": user-info, a host and
    a port of digits; anything else ("?x" straight after the host, ";u=http://...") is
    the tail, read again for URLs."""
    end = _AUTHORITY.match(rest).end()  # type: ignore[union-attr]  # it matches ""
    return rest[:end], rest[end:]


def _leftovers(text: str, report: LinkReport) -> str:
    """The last line of defence after the parse: a "scheme://" or "www." the reading above
    did not reach (a URL glued into a host part in a way no parser agrees on, an encoded
    one in a word that is not itself a URL) is broken too, so nothing a client or a
    redirector would follow is left."""
    def encoded(match: re.Match[str]) -> str:
        if "%" not in match.group(0):
            return match.group(0)
        plain = _unquoted(match.group(0))
        if plain == match.group(0) or not _URL.search(plain):
            return match.group(0)
        # depth 1: the words of this text are not looked into a second time.
        return _defang_all(_REQUOTE.sub(lambda m: quote(m.group(0)), plain), report, 1)

    def colon_slashes(match: re.Match[str]) -> str:
        # The scheme before it: at most 32 characters back are looked at.
        scheme = _SCHEME_BEFORE.search(text, max(0, match.start() - 32), match.start())
        if scheme is None or scheme.group(0).lower() in DEFANGED_SCHEMES:
            return match.group(0)
        report.defanged += 1
        return "[:]//"

    def www(match: re.Match[str]) -> str:
        report.defanged += 1
        return "www[.]"
    text = _WORD.sub(encoded, text)
    text = _COLON_SLASHES.sub(colon_slashes, text)
    return _WWW_LEFT.sub(www, text)


def _unquoted(text: str) -> str:
    for _ in range(_MAX_DECODE):
        plain = unquote(text, errors="replace")
        if plain == text:
            break
        text = plain
    return text


def defang_nested(tail: str, report: LinkReport, depth: int = 1) -> str:
    """The path, query and fragment of a URL with every URL inside them defanged. An
    encoded one is shown decoded (defanged, with only what would end the token encoded
    again): leaving it encoded would leave the redirector a live target to decode."""
    if depth > _MAX_NESTING:
        return tail.replace(".", "[.]").replace(":", "[:]")
    if "%" in tail:
        plain = _unquoted(tail)
        if plain != tail and _URL.search(plain):
            tail = _REQUOTE.sub(lambda m: quote(m.group(0)), plain)
    return _defang_all(tail, report, depth)


@lru_cache(maxsize=1)
def _suffixes():  # type: ignore[no-untyped-def]
    from publicsuffixlist import PublicSuffixList
    return PublicSuffixList()


def site_of(host: str) -> str:
    """The registrable domain (example.co.jp for www.example.co.jp); the host if unknown."""
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return host
    return _suffixes().privatesuffix(host.lower()) or host.lower()


def url_warnings(url: str, shown_text: str = "") -> list[str]:
    """The lures in one link: hidden host, look-alike host, text showing another site."""
    found = []
    host = host_of(url)
    scheme = _SCHEME.match(url)
    authority = _split_authority(url[scheme.end():] if scheme else url)[0]
    if "@" in authority:
        shown = authority.rsplit("@", 1)[0]
        found.append(f"a link that looks like {shown} but leads to {host}")
    if host and not host.isascii():
        try:
            found.append(f"a host name in non-Latin letters: {host} "
                         f"(really {host.encode('idna').decode('ascii')})")
        except UnicodeError:
            found.append(f"a host name that is not valid: {host}")
    elif any(label.startswith("xn--") for label in host.split(".")):
        try:
            shown = host.encode("ascii").decode("idna")
        except UnicodeError:
            shown = host
        found.append(f"a host name in punycode: {host} (shows as {shown})")
    if shown_text and host:
        for match in _SHOWN_DOMAIN.finditer(shown_text):
            domain = match.group(1).lower().rstrip(".")
            if site_of(domain) != site_of(host):
                found.append(f"a link whose text shows {domain} but leads to {host}")
                break
    return found


def _defang_all(text: str, report: LinkReport, depth: int) -> str:
    def one(match: re.Match[str]) -> str:
        url, trailing = _split_trailing(match.group(0))
        if url.lower().startswith("mailto:"):
            # The address stays (clients link bare addresses anyway); a URL it carries
            # in ?body= does not.
            return url[:7] + defang_nested(url[7:], report, depth + 1) + trailing
        scheme = _SCHEME.match(url)
        authority, tail = _split_authority(url[scheme.end():] if scheme else url)
        if scheme and scheme.group(1).lower() in DEFANGED_SCHEMES and "[.]" in authority:
            # Defanged already (a forwarded warning): what it carries may still be live.
            return (url[:scheme.end()] + authority + defang_nested(tail, report, depth + 1)
                    + trailing)
        report.defanged += 1
        for warning in url_warnings(url):
            report.warn(warning)
        return defang(url, report, depth) + trailing
    return _URL.sub(one, text)


def defang_text(text: str, report: LinkReport) -> str:
    """Every URL in plain text defanged, those inside other URLs too; lures noted in the
    report."""
    return _leftovers(_defang_all(text, report, 0), report)
