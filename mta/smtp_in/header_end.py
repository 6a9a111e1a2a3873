"""Where a message's header section ends, decided as Postfix's cleanup decides it.

A header line is a field name (printable ASCII, no space, no colon; blanks may follow it)
and a colon, or a continuation (a line starting with a space or a tab) of the field above.
The first line that is neither ends the header, and an empty line is put before it: a
UTF-8 BOM before the first field, a fold that lost its indentation, a field name with a
byte that is not ASCII, or a body that follows its header without the empty line. Mail
clients disagree about such lines (one shows them as headers, another as text); deciding
once on the way in, the way Postfix does, means every milter behind either MTA reads the
same header, and what we deliver has its header and body where a reader looks for them.
"""
from __future__ import annotations

import re

CRLF = b"\r\n"
# smtpd passes a line longer than this on in parts, the first part holding at least
# LONG_LINE - 1 bytes of the line once a leading dot is unstuffed (its CR may still be on
# its way). A line is judged on its first LONG_LINE - 2 bytes, its window: a line smtpd cut
# is then surely longer than its window, as the whole text shows it, so the judgement never
# depends on how the client's packets cut the line. A window of name characters without
# the colon yet counts as a field.
LONG_LINE = 64 * 1024
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")
_NAME_SO_FAR = re.compile(rb"[!-9;-~]+[ \t]*")


def is_header_line(line: bytes, after_field: bool, limit: int = LONG_LINE,
                   cut: bool = False) -> bool:
    """`line` (without its CRLF; `cut`: more of it follows) can stand in a header: a field,
    or the continuation of the field above when there is one."""
    if after_field and line[:1] in (b" ", b"\t"):
        return True
    window = limit - 2
    if _FIELD_START.match(line, 0, window):
        return True
    # Longer than the window and nothing but a name so far: not ours to cut.
    return (cut or len(line) > window) and _NAME_SO_FAR.fullmatch(line, 0, window) is not None


def first_stray_line(head: bytes, after_field: bool = False, limit: int = LONG_LINE,
                     cut: bool = False) -> int | None:
    """The offset in `head` of the first line that ends the header early, or None.
    `head` starts at a line start and holds header lines up to (not past) the empty line
    that ends them; `cut`: its last line goes on (a long line passed on in parts)."""
    pos = 0
    while pos < len(head):
        end = head.find(CRLF, pos)
        line = head[pos:] if end < 0 else head[pos:end]
        if not line and end >= 0:
            return None  # the empty line: the header ends where it should
        if not is_header_line(line, after_field, limit, cut=end < 0 and cut):
            return pos
        after_field = True
        if end < 0:
            return None
        pos = end + 2
    return None


def with_header_ended(text: bytes, limit: int = LONG_LINE) -> bytes:
    """The whole message with the empty line put where its header really ends (scan's
    messages come from a file, not through smtpd)."""
    blank = text.find(b"\r\n\r\n")
    head = text if blank < 0 else text[:blank + 2]
    stray = first_stray_line(head, limit=limit)
    if stray is None:
        return text
    return text[:stray] + CRLF + text[stray:]
