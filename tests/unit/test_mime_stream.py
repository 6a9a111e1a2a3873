"""Taking attachments out of a raw message by byte ranges and writing new parts in: every
sample keeps its text exactly, loses exactly its attachments, gains exactly the new parts,
and parses cleanly afterwards; the same from an mmap as from bytes."""
from __future__ import annotations

import base64
import email
import mmap
import os
import tempfile
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from milters.core.mime.scan import parts_by_skeleton, scan
from milters.core.mime.parts import find_attachments
from milters.core.mime.stream import NewPart, copy_header, decoded, rebuild

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted(p.name for p in (ROOT / "samples").glob("*.eml"))
NOTE = NewPart(b"Content-Type: text/plain; charset=us-ascii\r\n\r\nfiles were removed\r\n")


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def texts(message: EmailMessage) -> list[str]:
    """The text a reader sees: text leaves outside attachments (and outside forwarded
    messages, which are attachments)."""
    ids = {id(a.part) for a in find_attachments(message)}
    found, stack = [], [message]
    while stack:
        part = stack.pop()
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            stack.extend(reversed(list(part.iter_parts())))
        elif part.get_content_maintype() == "text" and id(part) not in ids:
            found.append(part.get_content())
    return found


def whole(raw: bytes, header_changes: dict[str, str | None], body: bytes) -> bytes:
    return copy_header(raw, header_changes, []) + body


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_loses_its_attachments_and_keeps_its_text(name: str) -> None:
    raw = (ROOT / "samples" / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    root = scan(raw)
    found = find_attachments(root.skeleton)
    by_skeleton = parts_by_skeleton(root)
    # The decoded bytes from the ranges equal what the stdlib's full parse decodes.
    reference = find_attachments(parse(raw))
    for mine, theirs in zip(found, reference):
        assert b"".join(decoded(raw, by_skeleton[id(mine.part)])) == theirs.data, mine.filename
    rebuilt = rebuild(raw, root, [by_skeleton[id(a.part)] for a in found], [NOTE])
    result = parse(whole(raw, rebuilt.mime_headers, rebuilt.body.read()))
    assert find_attachments(result) == []
    assert not result.defects, result.defects
    # Every text the reader saw is still there, in order, and the note comes last.
    assert texts(result) == texts(parse(raw)) + ["files were removed\r\n"]


def test_a_message_that_is_itself_a_file_is_wrapped() -> None:
    data = os.urandom(3000)
    raw = (b"From: a@example.jp\r\nSubject: scan\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: application/pdf; name=scan.pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(data).replace(b"\n", b"\r\n"))
    root = scan(raw)
    (found,) = find_attachments(root.skeleton)
    rebuilt = rebuild(raw, root, [parts_by_skeleton(root)[id(found.part)]], [NOTE])
    assert rebuilt.mime_headers["Content-Type"].startswith("multipart/mixed; boundary=")
    assert rebuilt.mime_headers["Content-Transfer-Encoding"] is None
    result = parse(whole(raw, rebuilt.mime_headers, rebuilt.body.read()))
    assert [p.get_content_type() for p in result.iter_parts()] == ["text/plain"]
    assert result["Subject"] == "scan"


def test_missing_closing_delimiter_and_an_mmap_give_the_same_result() -> None:
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\nbody\r\n--b\r\n"
           b"Content-Type: application/octet-stream; name=x.bin\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n")  # no closing --b--
    with tempfile.TemporaryFile() as file:
        file.write(raw)
        file.flush()
        mapped = mmap.mmap(file.fileno(), len(raw), access=mmap.ACCESS_READ)
        results = []
        for source in (raw, mapped):
            root = scan(source)
            (found,) = find_attachments(root.skeleton)
            part = parts_by_skeleton(root)[id(found.part)]
            assert b"".join(decoded(source, part)) == b"\x00\x01\x02"
            results.append(rebuild(source, root, [part], [NOTE]).body.read())
        mapped.close()
    assert results[0] == results[1]
    result = parse(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + results[0])
    assert [p.get_content() for p in result.iter_parts()] == ["body\r\n",
                                                              "files were removed\r\n"]
