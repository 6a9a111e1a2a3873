"""What a delivered copy of a torture message (tests/harness/mime_torture.py) must show, read
the way a recipient reads it: the stdlib's parser for the structure, 7z for the ZIP, the
live-URL reader (tests/harness/live_urls.py) for links, an HTML parser for active content.

``files_protected(message, output, password, tmp)``
    every file of the input is inside the ZIP (7z, byte for byte; an `.eml` entry counts
    when its own files hold it, as when the whole message went in), and no file, nor its
    encoded text, is anywhere outside the ZIP.
``active_html(output)``
    what in the output's HTML parts would act or fetch on its own.
``new_defects(sent, output)``
    the stdlib parser's defects in the output that the input did not have.
"""
from __future__ import annotations

import binascii
import email
import re
from email import policy as email_policy
from html.parser import HTMLParser
from pathlib import Path

from milters.core.message import Message
from milters.core.mime.locate import locate_attachments
from milters.core.mime.stream import decoded
from tests.harness.attfail_cases import open_zip, zip_and_clear
from tests.harness.mime_torture import ExpectedFile, TortureMessage, b64, uuencode, yencode


def found_files(raw: bytes) -> list[bytes]:
    """The files a message holds, as the core reads them (tests/unit/test_mime_torture.py
    shows it finds every file of the set)."""
    mime = Message(raw).mime_raw
    found = locate_attachments(mime)
    return [b"".join(decoded(mime, part)) for part in found.parts]


def _probes(expected: ExpectedFile) -> list[bytes]:
    """Pieces of a file that must not be readable outside the ZIP: its first bytes, and the
    first line of each encoding a client could decode."""
    data = expected.data
    if expected.kind != "file" or len(data) < 64:
        return []
    name = expected.name or "f"
    return [data[:48], b64(data)[:60], binascii.b2a_qp(data[:45], istext=False)[:40],
            uuencode(name, data).split(b"\r\n")[1], yencode(name, data).split(b"\r\n")[1][:60]]


def _encodings(expected: ExpectedFile) -> list[bytes]:
    """The file as each transfer encoding of the set writes it, without blanks."""
    if expected.kind != "file" or not expected.data:
        return []
    name, data = expected.name or "f", expected.data
    return [re.sub(rb"\s", b"", text) for text in (
        b64(data), binascii.b2a_qp(data, istext=False), uuencode(name, data),
        yencode(name, data))]


def files_protected(message: TortureMessage, output: bytes, password: str,
                    tmp: Path) -> None:
    archive, clear = zip_and_clear(output)
    assert archive is not None, f"{message.name}: no ZIP in\n{output[:1500]!r}"
    entries = open_zip(archive, password, tmp)
    inside = list(entries)
    for entry in entries:
        if entry.endswith((b"\r\n", b"\n")) and b":" in entry[:200]:  # a message: its files
            inside += found_files(entry)
            # A header the MTA ended early (a BOM, an 8-bit field name): what a lenient
            # client still reads as the message's header is in its body.
            blank = -2 if entry.startswith(b"\r\n") else entry.find(b"\r\n\r\n")
            inside += found_files(entry[blank + 4:]) if blank != -1 else []
    # The whole message in the ZIP as an MTA before us passed it (Postfix turns a bare CR
    # into a space): the file's encoded text is there, blanks aside.
    squeezed = [re.sub(rb"\s", b"", entry) for entry in entries]
    for expected in message.files:
        body = expected.data.strip(b"\r\n")
        assert any(blob == expected.data or (expected.kind != "file" and body in blob)
                   for blob in inside) or any(
            encoded in entry for encoded in _encodings(expected) for entry in squeezed), \
            f"{message.name}: {expected.name or expected.kind} not in the ZIP " \
            f"({[len(e) for e in entries]} bytes)"
        for probe in _probes(expected):
            assert probe not in clear and probe not in output, \
                f"{message.name}: {expected.name} readable outside the ZIP"
    # Nothing but the ZIP is a file to a reader.
    others = [data for data in found_files(output) if data != archive]
    assert not any(data in (f.data for f in message.files) for data in others), message.name


class _Active(HTMLParser):
    FETCHING = {"href", "src", "action", "data", "background", "formaction", "poster",
                "srcset", "xlink:href"}
    ACTING = {"script", "iframe", "frame", "object", "embed", "form", "applet", "base"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.ACTING:
            self.found.append(f"<{tag}>")
        if tag == "meta" and any(n == "http-equiv" and (v or "").lower() == "refresh"
                                 for n, v in attrs):
            self.found.append("<meta refresh>")
        for name, value in attrs:
            value = (value or "").strip().lower()
            if name.startswith("on"):
                self.found.append(f"{tag}@{name}")
            elif name in self.FETCHING and value and not value.startswith(("cid:", "#")):
                self.found.append(f"{tag}@{name}={value[:40]}")
            elif name == "style" and "url(" in value:
                self.found.append(f"{tag}@style url()")
        self._in_style = tag == "style"

    def handle_data(self, data: str) -> None:
        if self._in_style and "url(" in data.lower():
            self.found.append("<style> url()")

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False


def active_html(output: bytes) -> list[str]:
    message = email.message_from_bytes(output, policy=email_policy.compat32)
    found: list[str] = []
    for part in message.walk():
        if part.get_content_type() != "text/html":
            continue
        data = part.get_payload(decode=True) or b""
        parser = _Active()
        parser.feed(data.decode(part.get_content_charset() or "utf-8", "replace"))
        parser.close()
        found += parser.found
    return found


def defects(raw: bytes) -> set[str]:
    message = email.message_from_bytes(raw, policy=email_policy.compat32)
    return {type(defect).__name__ for part in message.walk() for defect in part.defects}


def new_defects(sent: bytes, output: bytes) -> set[str]:
    return defects(output) - defects(sent)
