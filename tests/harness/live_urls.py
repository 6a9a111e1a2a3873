"""Finding live URLs in a message the way a mail client would, to check the neutralize
milter's output: the message is parsed (every part, embedded messages and message/* reports
included), each text decoded, HTML parsed, and every token read as a URL.

Live means what a client links or a redirector follows:
- `scheme://host` (any scheme) whose host is a dotted name or an IP address, found anywhere
  in a token (inside another URL's path or query too), before or after percent-decoding;
  the defanged schemes hxxp, hxxps and fxp are not live, nor a host written `a[.]example`;
- `www.` followed by a dotted name;
- any `href`, `src` (other than cid:), `action` or similar attribute in HTML.
`mailto:` addresses may stay: clients link bare addresses anyway, and defanging every
address would make replies impossible; what a mailto carries (?body=http://...) may not.
"""
from __future__ import annotations

import email
import ipaddress
import re
from email import policy as email_policy
from email.message import Message
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit

DEFANGED = {"hxxp", "hxxps", "fxp"}
# Embedded messages: their header fields are not shown as text (nor linked).
EMBEDDED = {"message/rfc822", "message/global"}
_SCHEME_BEFORE = re.compile(r"(?i)[a-z][a-z0-9+.-]*$")
_WWW = re.compile(r"(?i)(?<![a-z0-9.-])www\.[a-z0-9\u00a1-\uffff-]+\.[a-z0-9\u00a1-\uffff]")
_TOKEN_END = re.compile(r"""[\s<>"'\u3000-\u303f]+""")


def _host_is_live(host: str) -> bool:
    host = host.strip("[]")
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return "." in host or "\u3002" in host  # an ideographic full stop is a dot to IDNA


def live_in_token(token: str) -> list[str]:
    """The live URLs in one whitespace-free token, percent-decoding undone up to 5 times."""
    found: list[str] = []
    seen = set()
    for _ in range(6):
        if token in seen:
            break
        seen.add(token)
        at = token.find("://")
        while at >= 0:
            scheme = _SCHEME_BEFORE.search(token, max(0, at - 64), at)
            if scheme and scheme.group(0).lower() not in DEFANGED:
                candidate = token[scheme.start():at + 300]
                try:
                    host = urlsplit(candidate).netloc.rsplit("@", 1)[-1].split(":")[0]
                except ValueError:
                    host = candidate[len(scheme.group(0)) + 3:].split("/")[0]
                host = host[:255]
                if _host_is_live(host):
                    found.append(candidate)
            at = token.find("://", at + 3)
        found += [m.group(0) for m in _WWW.finditer(token)]
        token = unquote(token, errors="replace")
    return found


def live_in_text(text: str) -> list[str]:
    return [url for token in _TOKEN_END.split(text) for url in live_in_token(token)]


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            value = (value or "").strip()
            if name in ("href", "action", "formaction", "background", "poster", "srcset",
                        "src", "data", "codebase", "cite") and not value.lower().startswith(
                            ("cid:", "#")):
                self.found.append(f"<{tag} {name}={value}>")
            else:
                self.found += live_in_text(value)

    def handle_data(self, data: str) -> None:
        self.found += live_in_text(data)


def _text_of(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload()).encode("utf-8", "surrogateescape")
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("utf-8", errors="replace")


def live_urls(raw: bytes) -> list[str]:
    """Every live URL in the text a reader sees: text/* parts and message/* parts that are
    text (reports, news), at any depth, embedded messages included. Attachments that are
    not text (PDF, pictures) are not read here."""
    message = email.message_from_bytes(raw, policy=email_policy.compat32)
    found: list[str] = []
    stack: list[tuple[Message, str]] = [(message, "")]
    while stack:
        part, parent_type = stack.pop()
        ctype = part.get_content_type()
        if parent_type.startswith("message/") and parent_type not in EMBEDDED:
            # The parser reads a report (delivery status, feedback, news) as header blocks:
            # its fields are the report's text.
            found += [url for value in part.values() for url in live_in_text(str(value))]
        if part.is_multipart():
            stack += [(child, ctype) for child in part.get_payload()]
        elif ctype == "text/html":
            parser = _Html()
            parser.feed(_text_of(part))
            parser.close()
            found += parser.found
        elif ctype.startswith(("text/", "message/")) or parent_type.startswith("message/"):
            found += live_in_text(_text_of(part))
    return found
