"""Apply a milter's end-of-message edits to a message in transit, with Postfix's semantics.

- addheader appends; insheader(index) inserts before the index-th header (0 = the top);
- chgheader(name, index, value): index 1 is the first header of that name (any case); an
  empty value deletes it; a header that is not there is appended (when the value is not empty);
- replbody replaces the body; addrcpt/addrcpt_par/delrcpt/chgfrom change the envelope;
- quarantine marks the message to be held.
Header values from a milter that negotiated HDR_LEADSPC carry their own leading space;
otherwise one space follows the colon, as Postfix writes it.

An edit of the content writes a new text (message_text.TextWriter: a file in the spool's
tmp/ unless it is small), never the message rebuilt in memory: the header fields are read
from the old text's head, the body is copied file to file or read from the milter's new
body a piece at a time. Envelope edits alone leave the text as it is (the same object).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from milters.core.edits import (AddHeader, AddRecipient, ChangeFrom, ChangeHeader,
                                DeleteRecipient, Edit, Quarantine, ReplaceBody)

from .message_text import MessageText, TextWriter

_FIELD_START = re.compile(rb"^[!-9;-~]+:")


@dataclass
class Transit:
    """A message on its way through the chain: its text (bytes are taken as a small text)
    and its envelope. `workdir` is where edited texts are written (serve: the spool's tmp/;
    None: the system's temporary directory); `scratch` names every file written for this
    message, shared by the Transits derived from it, for remove_scratch()."""

    content: MessageText | bytes
    sender: str
    recipients: list[tuple[str, str | None]] = field(default_factory=list)  # address, params
    quarantine: str | None = None
    workdir: str | None = None
    scratch: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.content, MessageText):
            self.content = MessageText.of(bytes(self.content))

    @property
    def text(self) -> MessageText:
        assert isinstance(self.content, MessageText)
        return self.content

    @property
    def raw(self) -> bytes:
        """The whole text as bytes (scan, tests; serve never asks for it)."""
        return self.text.read()

    def remove_scratch(self, keep: str | None = None) -> None:
        """Remove the files written for this message, except `keep`."""
        for path in self.scratch:
            if path != keep:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self.scratch[:] = [keep] if keep in self.scratch else []

    def in_memory(self) -> "Transit":
        """This message with its text in memory and its files removed (scan's result)."""
        held = replace(self, content=MessageText.of(self.raw), scratch=[])
        self.remove_scratch()
        return held


def split_message(raw: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its continuation lines and CRLF) and the body."""
    fields, start = MessageText.of(raw).head()
    return fields, raw[start:]


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
    sender, recipients, quarantine = message.sender, list(message.recipients), message.quarantine
    header_edits: list[AddHeader | ChangeHeader] = []
    new_body: ReplaceBody | None = None
    for edit in edits:
        if isinstance(edit, (AddHeader, ChangeHeader)):
            header_edits.append(edit)
        elif isinstance(edit, ReplaceBody):
            new_body = edit  # the last one wins
        elif isinstance(edit, AddRecipient):
            if not any(_same_address(edit.address, r) for r, _ in recipients):
                recipients.append((edit.address, edit.params))
        elif isinstance(edit, DeleteRecipient):
            recipients = [(r, p) for r, p in recipients if not _same_address(edit.address, r)]
        elif isinstance(edit, ChangeFrom):
            sender = edit.address
        elif isinstance(edit, Quarantine):
            quarantine = edit.reason or "quarantined by a milter"
    text = message.text
    if header_edits or new_body is not None:
        text = _rewrite(message, header_edits, new_body, leading_space)
    return replace(message, content=text, sender=sender, recipients=recipients,
                   quarantine=quarantine)


def _edit_fields(fields: list[bytes], edits: list[AddHeader | ChangeHeader],
                 leading_space: bool) -> None:
    for edit in edits:
        if isinstance(edit, AddHeader):
            line = render_field(edit.name, edit.value, leading_space)
            if edit.index is None:
                fields.append(line)
            else:
                fields.insert(min(max(edit.index, 0), len(fields)), line)
            continue
        positions = [i for i, f in enumerate(fields) if field_name(f) == edit.name.lower()]
        if 1 <= edit.index <= len(positions):
            at = positions[edit.index - 1]
            if edit.value:
                fields[at] = render_field(edit.name, edit.value, leading_space)
            else:
                del fields[at]
        elif edit.value:
            fields.append(render_field(edit.name, edit.value, leading_space))


def _rewrite(message: Transit, header_edits: list[AddHeader | ChangeHeader],
             new_body: ReplaceBody | None, leading_space: bool) -> MessageText:
    """The edited text, written anew: the header fields (edited) and the empty line, then
    the new body or the old one copied from the old text."""
    fields, body_start = message.text.head()
    _edit_fields(fields, header_edits, leading_space)
    writer = TextWriter(message.workdir, message.scratch)
    try:
        writer.write(b"".join(fields) + b"\r\n")
        if new_body is None:
            writer.copy_text(message.text, body_start)
        elif isinstance(new_body.body, bytes):
            writer.write(new_body.body)
        else:
            writer.copy_stream(new_body.body)
        return writer.finish()
    except BaseException:
        writer.abandon()
        raise
