"""SMTP command syntax (RFC 5321 4.1): the verb and the MAIL FROM / RCPT TO arguments.

Lenient where Postfix is lenient (no angle brackets, spaces after the colon), strict where
leniency would let an address mean two things. Every failure is an SMTP reply line.
"""
from __future__ import annotations

import re
from typing import Iterator, NamedTuple

# Without a quote in the text, nothing is quoted or escaped: plain searches will do (the
# usual case; the character-by-character walk below cost a tenth of the MTA's Python).
# Controls: C0, DEL, C1 (valid UTF-8 in an SMTPUTF8 address, still a control: U+0085 is
# a line end to some) and the Unicode line and paragraph separators. An address goes into
# headers and milter macros; none of these may.
_CONTROL = "\x00-\x1f\x7f-\x9f\u2028\u2029"
_SPACE_OR_CONTROL = re.compile(f"[ {_CONTROL}]")
_IS_CONTROL = re.compile(f"[{_CONTROL}]")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


class PathArgument(NamedTuple):
    address: str  # without the angle brackets; "" is the null sender
    params: dict[str, str | None]  # ESMTP parameters, names upper-cased
    raw_params: list[str]  # as sent, for milters and the queue


class SyntaxProblem(Exception):
    """The reply for a command argument that cannot be used."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def split_command(line: bytes) -> tuple[str, str]:
    """(VERB upper-cased, argument) of one command line without its CRLF. Bytes that are
    not UTF-8 survive as surrogates and are refused where an address is parsed."""
    text = line.decode("utf-8", "surrogateescape")
    verb, _, arg = text.partition(" ")
    return verb.upper(), arg.strip()


def parse_path(arg: str, keyword: str) -> PathArgument:
    """Parse `FROM:<addr> PARAMS` (keyword "FROM") or `TO:<addr> PARAMS` (keyword "TO")."""
    head, colon, rest = arg.partition(":")
    if not colon or head.strip().upper() != keyword:
        usage = "MAIL FROM:<address>" if keyword == "FROM" else "RCPT TO:<address>"
        raise SyntaxProblem(f"501 5.5.4 Syntax: {usage}")
    rest = rest.lstrip()
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            raise SyntaxProblem("501 5.1.7 Bad address syntax (no closing '>')")
        address, tail = rest[1:end], rest[end + 1:]
    else:
        # Without brackets the address ends at the first space, and the parameters follow.
        address, space, tail = rest.partition(" ")
        tail = space + tail
        if not address:
            usage = "MAIL FROM:<address>" if keyword == "FROM" else "RCPT TO:<address>"
            raise SyntaxProblem(f"501 5.5.4 Syntax: {usage}")
    if tail and not tail.startswith(" "):
        raise SyntaxProblem("501 5.5.4 Bad parameters (a space must follow the address)")
    problem = _address_problem(address)
    if problem:
        raise SyntaxProblem(f"501 5.1.7 Bad address syntax{problem}")
    if not address and keyword == "TO":  # "<>" is the null sender, never a recipient
        raise SyntaxProblem("501 5.1.3 Bad recipient address syntax")
    raw_params = tail.split()
    params: dict[str, str | None] = {}
    for param in raw_params:
        name, eq, value = param.partition("=")
        if (not name or not name.isascii() or not name.replace("-", "").isalnum()
                or _bad_characters(value)):
            raise SyntaxProblem(f"501 5.5.4 Bad parameter syntax: {param[:40]}")
        params[name.upper()] = value if eq else None
    return PathArgument(address, params, raw_params)


def _bad_characters(text: str) -> bool:
    """Control characters (NUL, CR, LF and the like: they would end a C string or a line
    further on) or bytes that were not UTF-8."""
    return any(ch < " " or ch == "\x7f" or "\udc80" <= ch <= "\udcff" for ch in text)


def _with_quoting(text: str) -> Iterator[tuple[int, str, bool]]:
    """Each character with whether it stands outside a quoted string, so that a backslash
    escape or a quoted '>' or space is not taken for syntax."""
    quoted = escaped = False
    for index, ch in enumerate(text):
        yield index, ch, not quoted and not escaped and ch != '"'
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted


def _address_problem(address: str) -> str:
    """Why the address cannot be used ("" if it can): a space or tab only inside a quoted
    local part, no other control characters anywhere, nothing that was not UTF-8."""
    if _NOT_UTF8.search(address):
        return " (not UTF-8)"
    if '"' not in address:
        found = _SPACE_OR_CONTROL.search(address)
        if found is None:
            return ""
        return (" (white space outside quotes)" if found.group() in " \t"
                else " (control character)")
    for _, ch, outside in _with_quoting(address):
        if ch in " \t":
            if outside:
                return " (white space outside quotes)"
        elif _IS_CONTROL.match(ch):
            return " (control character)"
    return ""


def _closing_bracket(text: str) -> int:
    """Index of the '>' that closes the path, skipping '>' inside a quoted local part."""
    if '"' not in text:
        return text.find(">", 1)
    return next((index for index, ch, outside in _with_quoting(text)
                 if index > 0 and ch == ">" and outside), -1)
