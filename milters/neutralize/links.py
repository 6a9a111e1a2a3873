"""Links made harmless in text: `https://example.com/x` becomes `hxxps://example[.]com/x`,
which a mail client no longer turns into a link but a reader can still see and judge.

Also the classic lures are named so the note can warn about them: a URL whose user-info
hides the real host (`https://bank.example@evil.example/`), punycode or non-ASCII host
names (look-alike letters), and link text that shows one domain over a link to another.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

# A URL in running text: a scheme with "//", or a bare "www." host. Text ends at
# whitespace, quotes and angle brackets; trailing punctuation is trimmed below.
_URL = re.compile(r"""(?i)\b(?:(?:https?|ftp|hxxps?|fxp)://|www\.)[^\s<>"'\u3000-\u303f]+""")
_TRAILING = ".,;:!?)]}'\u3001\u3002"
_SCHEMES = {"http": "hxxp", "https": "hxxps", "ftp": "fxp"}
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


def defang(url: str) -> str:
    """hxxps://example[.]com/path: the scheme broken and the host's dots bracketed."""
    scheme, sep, rest = url.partition("://")
    if sep:
        scheme = _SCHEMES.get(scheme.lower(), scheme)
    else:
        rest = url
    authority, slash, tail = rest.partition("/")
    if "?" in authority or "#" in authority:  # "example.com?x": the query starts early
        cut = min(i for i in (authority.find("?"), authority.find("#")) if i >= 0)
        authority, tail, slash = authority[:cut], authority[cut:] + slash + tail, ""
    authority = authority.replace(".", "[.]").replace("@", "[@]")
    return (scheme + sep if sep else "") + authority + slash + tail


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
    authority = url.partition("://")[2].split("/", 1)[0]
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


def defang_text(text: str, report: LinkReport) -> str:
    """Every URL in plain text defanged; lures noted in the report."""
    def one(match: re.Match[str]) -> str:
        url, trailing = _split_trailing(match.group(0))
        if url.lower().startswith(("hxxp", "fxp")):
            return match.group(0)  # defanged already (a forwarded warning)
        report.defanged += 1
        for warning in url_warnings(url):
            report.warn(warning)
        return defang(url) + trailing
    return _URL.sub(one, text)
