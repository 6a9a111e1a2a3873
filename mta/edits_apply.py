"""Apply a milter's end-of-message edits to a message in transit, with Postfix's semantics.

- addheader appends; insheader(index) inserts before the index-th header (0 = the top);
- chgheader(name, index, value): index 1 is the first header of that name (any case); an
  empty value deletes it; a header that is not there is appended (when the value is not empty);
- replbody replaces the body; addrcpt/addrcpt_par/delrcpt/chgfrom change the envelope;
- quarantine marks the message to be held.
Header values from a milter that negotiated HDR_LEADSPC carry their own leading space;
otherwise one space follows the colon, as Postfix writes it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from milters.core.edits import (AddHeader, AddRecipient, ChangeFrom, ChangeHeader,
                                DeleteRecipient, Edit, Quarantine, ReplaceBody)

_FIELD_START = re.compile(rb"^[!-9;-~]+:")


@dataclass
class Transit:
    """A message on its way through the chain: raw bytes with CRLF, and its envelope."""

    raw: bytes
    sender: str
    recipients: list[tuple[str, str | None]] = field(default_factory=list)  # address, params
    quarantine: str | None = None


def split_message(raw: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its continuation lines and CRLF) and the body."""
    end = raw.find(b"\r\n\r\n")
    head, body = (raw, b"") if end < 0 else (raw[:end + 2], raw[end + 4:])
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line  # a continuation line belongs to the field above
        elif line.strip():
            fields.append(line)
    return fields, body


def join_message(fields: list[bytes], body: bytes) -> bytes:
    return b"".join(fields) + b"\r\n" + body


def field_name(line: bytes) -> str:
    match = _FIELD_START.match(line)
    return match.group(0)[:-1].decode("ascii").lower() if match else ""


def render_field(name: str, value: str, leading_space: bool) -> bytes:
    """One header field; a value folded by the milter with bare LF gets CRLF."""
    text = f"{name}:{value}" if leading_space else f"{name}: {value}"
    text = re.sub(r"\r?\n", "\r\n", text)
    return text.encode("utf-8", "surrogateescape") + b"\r\n"


def _same_address(a: str, b: str) -> bool:
    return a.strip("<>").lower() == b.strip("<>").lower()


def apply_edits(message: Transit, edits: list[Edit], *, leading_space: bool = False) -> Transit:
    if not edits:
        return message  # the same object: the caller can tell that nothing changed
    fields, body = split_message(message.raw)
    sender, recipients, quarantine = message.sender, list(message.recipients), message.quarantine
    for edit in edits:
        if isinstance(edit, AddHeader):
            line = render_field(edit.name, edit.value, leading_space)
            if edit.index is None:
                fields.append(line)
            else:
                fields.insert(min(max(edit.index, 0), len(fields)), line)
        elif isinstance(edit, ChangeHeader):
            positions = [i for i, f in enumerate(fields) if field_name(f) == edit.name.lower()]
            if 1 <= edit.index <= len(positions):
                at = positions[edit.index - 1]
                if edit.value:
                    fields[at] = render_field(edit.name, edit.value, leading_space)
                else:
                    del fields[at]
            elif edit.value:
                fields.append(render_field(edit.name, edit.value, leading_space))
        elif isinstance(edit, ReplaceBody):
            body = edit.body
        elif isinstance(edit, AddRecipient):
            if not any(_same_address(edit.address, r) for r, _ in recipients):
                recipients.append((edit.address, edit.params))
        elif isinstance(edit, DeleteRecipient):
            recipients = [(r, p) for r, p in recipients if not _same_address(edit.address, r)]
        elif isinstance(edit, ChangeFrom):
            sender = edit.address
        elif isinstance(edit, Quarantine):
            quarantine = edit.reason or "quarantined by a milter"
    return replace(message, raw=join_message(fields, body), sender=sender,
                   recipients=recipients, quarantine=quarantine)
