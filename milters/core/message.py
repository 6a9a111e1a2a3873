"""The message model every milter works on: raw bytes, the parsed MIME tree and the envelope.

The raw bytes are kept because signatures (DKIM) and faithful re-injection need them
exactly as received; the parsed tree (stdlib `email`, policy=default) is built lazily
because rate limiting and most envelope checks never look at the body.
"""
from __future__ import annotations

import ipaddress
import mmap
import re
import tempfile
from dataclasses import dataclass, field
from email import policy as email_policy
from email.errors import HeaderParseError
from email.header import decode_header
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from functools import lru_cache
from typing import Any, BinaryIO

from .errors import MessageError
from .jis import decode_cp50220
from .mime.lineends import normalize_line_ends, to_crlf


@dataclass
class Recipient:
    address: str
    params: dict[str, str | None] = field(default_factory=dict)
    # True when the MTA already rejected this recipient and only tells us (SMFIP_RCPT_REJ).
    rejected_by_mta: bool = False


@dataclass
class Envelope:
    """What the MTA told us about the SMTP session and transaction."""

    client_ip: str | None = None
    client_name: str | None = None
    helo: str | None = None
    mail_from: str | None = None
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    auth_user: str | None = None
    queue_id: str | None = None
    macros: dict[str, str] = field(default_factory=dict)

    @property
    def client_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The client IP as an address object; None for unix-socket or unparseable clients."""
        return parse_client_ip(self.client_ip) if self.client_ip else None

    @property
    def sender_domain(self) -> str | None:
        return domain_of(self.mail_from)

    def accepted_recipients(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.rejected_by_mta]

    def start_transaction(self) -> None:
        """Forget the previous transaction's envelope (RSET or a second MAIL FROM)."""
        self.mail_from = None
        self.mail_params = {}
        self.recipients = []
        self.queue_id = None


@lru_cache(maxsize=4096)
def parse_client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse once per distinct client (it is asked for at every stage); IPv4-mapped IPv6
    addresses become IPv4, so one client has one key whichever socket family it used."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def strip_brackets(address: str) -> str:
    """'<user@example.jp>' -> 'user@example.jp'; the null sender '<>' -> ''."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


_JIS_CHARSETS = {"iso-2022-jp", "iso2022-jp", "iso-2022-jp-ms", "cp50220", "cp50221",
                 "iso-2022-jp-1", "iso-2022-jp-2", "iso-2022-jp-3"}
_SJIS_CHARSETS = {"shift_jis", "shift-jis", "sjis", "x-sjis", "ms_kanji", "cp932", "windows-31j"}


def decode_charset(data: bytes, charset: str | None) -> str:
    """Bytes in a declared charset to text, reading Japanese charsets the way Windows mail
    clients write them (CP50220 for ISO-2022-JP, CP932 for Shift_JIS); never raises."""
    name = (charset or "us-ascii").lower()
    if name in _JIS_CHARSETS:
        return decode_cp50220(data)
    if name in _SJIS_CHARSETS:
        name = "cp932"
    try:
        return data.decode(name, errors="replace")
    except (LookupError, UnicodeError):  # an unknown label, or a codec that cannot replace
        return data.decode("utf-8", errors="replace")  # (idna, punycode): show what we can


def decode_words(value: str) -> str:
    """Unfold a header value and decode its RFC 2047 encoded words."""
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", value)
    try:
        parts = decode_header(unfolded)
    except (ValueError, IndexError, TypeError, HeaderParseError):  # broken words: keep raw text
        return unfolded.strip()
    text = "".join(part if isinstance(part, str) else decode_charset(part, charset)
                   for part, charset in parts)
    return text.strip()


def domain_of(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    return address.rsplit("@", 1)[1].rstrip(".").lower() or None


def parse_bytes(raw: bytes, policy: Any) -> EmailMessage:
    """The MIME tree of `raw`. The modern policy decodes header parameters while it builds
    the tree and raises on some real mail (an RFC 2231 ISO-2022-JP file name holding ① or
    ㈱, which Python's iso2022_jp codec lacks); such mail is parsed with compat32 rules,
    which keep the raw text, into the same EmailMessage class."""
    try:
        try:
            parsed = BytesParser(policy=policy).parsebytes(raw)
        except (UnicodeError, LookupError, ValueError):
            parsed = BytesParser(_class=EmailMessage,
                                 policy=email_policy.compat32).parsebytes(raw)
    except RecursionError:  # hundreds of nested multiparts: a parser bomb, not mail
        raise MessageError("MIME parts nested too deeply to parse") from None
    assert isinstance(parsed, EmailMessage)
    return parsed


@dataclass
class Message:
    """One message as a milter sees it at end of data. `raw` is kept exactly as it came
    (signatures need it); MIME is read from `mime_raw`."""

    raw: bytes
    envelope: Envelope = field(default_factory=Envelope)
    # Results from earlier milters (e.g. the auth milter's verdicts), keyed by milter name.
    results: dict[str, Any] = field(default_factory=dict)
    _parsed: EmailMessage | None = field(default=None, repr=False)
    _headers: list[tuple[str, str]] | None = field(default=None, repr=False)
    _mime_raw: Any = field(default=None, repr=False, compare=False)
    _head_parsed: EmailMessage | None = field(default=None, repr=False, compare=False)

    @property
    def mime_raw(self) -> bytes:
        """The message with every line end CRLF (bare CR and bare LF normalised, as mail
        clients read them): what a milter reads MIME from (scan, locate_attachments) and
        rebuilds from, so the byte ranges and the rewrite agree. The same object as `raw`
        when its line ends were CRLF already (no copy)."""
        if self._mime_raw is None:
            self._mime_raw = normalize_line_ends(self.raw)
        return self._mime_raw  # type: ignore[no-any-return]

    @property
    def email(self) -> EmailMessage:
        if self._parsed is None:
            self._parsed = parse_bytes(self.raw, email_policy.default)
        return self._parsed

    def header_text(self, name: str) -> str | None:
        """The first header `name`, unfolded and with RFC 2047 words decoded (Japanese
        ISO-2022-JP words with Windows extensions included); None when absent."""
        for key, raw in self._head().raw_items():
            if key.lower() == name.lower():
                return decode_words(str(raw))
        return None

    def _head(self) -> EmailMessage:
        """The header section alone, read as mail clients read it (scan.header_bytes: a BOM,
        8-bit bytes in a field name or a line that is not a field do not end the headers
        and lose every field after them). Milters that only read headers (auth, ratelimit)
        need not pay for parsing a large MIME body."""
        if self._head_parsed is None:
            self._head_parsed = BytesHeaderParser(policy=email_policy.default).parsebytes(
                header_section_of(self.raw))
        return self._head_parsed  # type: ignore[return-value]

    def raw_headers(self) -> list[tuple[str, str]]:
        """Every header as (name, value) in order, undecoded but for UTF-8 (RFC 6532), which
        the stdlib parser leaves as surrogate escapes."""
        if self._headers is None:
            self._headers = [(name, _utf8_text(str(value)))
                             for name, value in self._head().raw_items()]
        return self._headers

    def raw_header(self, name: str) -> str | None:
        """The first header `name` as it came (undecoded), from the header section alone."""
        lowered = name.lower()
        return next((value for key, value in self.raw_headers() if key.lower() == lowered),
                    None)

    @property
    def subject(self) -> str:
        return self.header_text("Subject") or ""

    @property
    def decoded_subject(self) -> str:
        """The subject, decoded, without parsing the body (header_text parses it all)."""
        return decode_words(self.raw_header("Subject") or "")

    @classmethod
    def from_headers_and_body(cls, headers: list[tuple[str, str]], body: bytes,
                              envelope: Envelope | None = None,
                              leading_space: bool = False) -> "Message":
        """Rebuild the raw message from milter header callbacks, CRLF line ends as on the
        wire (MTAs differ: Postfix folds header values with a bare LF). With
        `leading_space` (SMFIP_HDR_LEADSPC) each value keeps its own space after the colon."""
        return cls(raw=header_section(headers, leading_space) + body,
                   envelope=envelope or Envelope())

    @classmethod
    def from_headers_and_file(cls, headers: list[tuple[str, str]], body: BinaryIO,
                              envelope: Envelope | None = None,
                              leading_space: bool = False) -> "Message":
        """The same from a spooled body, for milters that must not hold a large message in
        memory: `raw` is then an mmap of a temporary file (bytes while it is small)."""
        whole = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        whole.write(header_section(headers, leading_space))
        body.seek(0)
        while piece := body.read(1024 * 1024):
            whole.write(piece)
        whole.flush()
        if not whole._rolled:  # noqa: SLF001 -- only SpooledTemporaryFile knows
            whole.seek(0)
            return cls(raw=whole.read(), envelope=envelope or Envelope())
        mapped = mmap.mmap(whole.fileno(), whole.tell(), access=mmap.ACCESS_READ)
        whole.close()  # the mapping keeps the (already unlinked) file's data
        return cls(raw=mapped, envelope=envelope or Envelope())  # type: ignore[arg-type]


SPOOL_IN_MEMORY = 1024 * 1024
_BLANK_LINE = re.compile(rb"\r\n\r\n|\n\n|\r\r|\r\n\n|\n\r\n")


def header_section_of(raw: bytes) -> bytes:
    """A message's header section, line ends CRLF, made readable (scan.header_bytes), and
    ending in the blank line; the whole message when it has no body."""
    from .mime.scan import header_bytes

    if bytes(raw[:1]) in (b"\r", b"\n"):  # the message starts with its blank line
        return b"\r\n"
    found = _BLANK_LINE.search(raw)
    section = to_crlf(bytes(raw[:found.start()] if found else raw)).rstrip(b"\r\n")
    return header_bytes(section, root=True) + b"\r\n\r\n"


def header_section(headers: list[tuple[str, str]], leading_space: bool = False) -> bytes:
    separator = ":" if leading_space else ": "
    return b"".join(_FOLD.sub("\r\n", f"{name}{separator}{value}").encode(
        "utf-8", "surrogateescape") + b"\r\n" for name, value in headers) + b"\r\n"


_FOLD = re.compile(r"\r?\n")


def _utf8_text(value: str) -> str:
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
