"""The core's reading of hostile MIME (issue 14): for every message of the torture set, and
for random mangled trees, every file the sender put in is found, named and decoded byte for
byte, and taking the found parts out leaves no file behind. A file the reader misses is a
file the attachments milter lets out in the clear."""
from __future__ import annotations

import mmap
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings

from milters.core.message import Message
from milters.core.mime.lineends import normalize_line_ends
from milters.core.mime.locate import locate_attachments
from milters.core.mime.stream import decoded
from milters.core.mime.scan import scan
from milters.core.mime.stream import NewPart, rebuild
from tests.harness.mime_torture import (CASES, TortureMessage, b64, mangled_bytes, mime_trees,
                                        torture_set, uuencode)

TORTURE = torture_set()
NOTE = NewPart(b"Content-Type: text/plain; charset=us-ascii\r\n\r\nfiles were removed\r\n")


def found_files(raw: bytes) -> list[tuple[str, bytes]]:
    mime = Message(raw).mime_raw
    found = locate_attachments(mime)
    return [(a.filename, b"".join(decoded(mime, part)))
            for a, part in zip(found.attachments, found.parts)]


def assert_all_found(message: TortureMessage) -> None:
    got = found_files(message.raw)
    assert [data for _, data in got] == [f.data for f in message.files], message.name
    for (name, _), expected in zip(got, message.files):
        if expected.name is not None:
            assert name == expected.name, message.name


@pytest.mark.parametrize("name", CASES)
def test_every_file_is_found_named_and_decoded(name: str) -> None:
    assert_all_found(TORTURE[name])


@pytest.mark.parametrize("name", CASES)
def test_taking_the_found_parts_out_leaves_no_file(name: str) -> None:
    """What the attachments milter writes when it encrypts or deletes everything: the
    rebuilt message has no attachment left, and no file's encoded text either."""
    message = TORTURE[name]
    mime = Message(message.raw).mime_raw
    found = locate_attachments(mime)
    rebuilt = rebuild(mime, found.root, found.parts, [NOTE])
    body = rebuilt.body.read()
    header = bytes(mime[:found.root.body_start])
    for field, value in rebuilt.mime_headers.items():  # the header section as it will be
        header = b"".join(line + b"\r\n" for line in header.split(b"\r\n")
                          if not line.lower().startswith(field.lower().encode() + b":"))
        if value is not None:
            header = f"{field}: {value}\r\n".encode() + header
    out = header.rstrip(b"\r\n") + b"\r\n\r\n" + body
    assert found_files(out) == [], name
    for expected in message.files:
        if expected.kind == "file" and len(expected.data) >= 64:
            assert b64(expected.data)[:60] not in out, name
    assert b"\r\nbegin 644 " not in out and b"=ybegin" not in out and b"BinHex" not in out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mime_trees())
def test_random_mangled_trees_give_every_file(message: TortureMessage) -> None:
    assert_all_found(message)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mangled_bytes())
def test_cut_and_spliced_messages_never_raise(raw: bytes) -> None:
    mime = Message(raw).mime_raw
    root = scan(mime)
    found = locate_attachments(mime, root=root)
    for part in found.parts:
        b"".join(decoded(mime, part))
    rebuild(mime, root, found.parts, [NOTE]).body.close()


def test_line_ends_of_a_spooled_message_are_normalised_across_chunks() -> None:
    """A bare-CR message large enough to be an mmap (the milter's spooled form), with a
    CRLF split across the 1 MiB chunk boundary: every line end CRLF, none doubled."""
    message = TORTURE["bare_cr"]
    filler = b"X-Pad: " + b"p" * (1024 * 1024 - 9 - len(message.raw) % 7) + b"\r\n"
    raw = filler + message.raw.replace(b"\r", b"\r\n", 3) + b"\r" * 5
    with tempfile.TemporaryFile() as file:
        file.write(raw)
        file.flush()
        mapped = mmap.mmap(file.fileno(), len(raw), access=mmap.ACCESS_READ)
        normal = normalize_line_ends(mapped)
        data = normal[:] if isinstance(normal, mmap.mmap) else normal
    expected = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    assert data == expected


def test_crlf_message_is_not_copied() -> None:
    raw = TORTURE["rfc2231_boundary_charset"].raw
    assert Message(raw).mime_raw is raw
    assert Message(raw).raw is raw  # the bytes as received stay for DKIM


def test_uuencode_block_is_cut_out_exactly_and_the_text_around_it_stays() -> None:
    data = bytes(range(256)) * 3
    raw = (b"Subject: x\r\nContent-Type: text/plain\r\n\r\nbefore\r\n" + uuencode("f.bin", data)
           + b"after\r\n")
    found = locate_attachments(raw)
    assert [a.filename for a in found.attachments] == ["f.bin"]
    assert found.attachments[0].data == data
    body = rebuild(raw, found.root, found.parts, []).body.read()
    assert b"before" in body and b"after" in body and b"begin" not in body


def test_multipart_nested_deeper_than_the_limit_is_one_attachment() -> None:
    """A parser bomb is not split, but its content never passes as text: all of it is one
    attachment (fail closed)."""
    node = b"Content-Type: application/pdf; name=x.pdf\r\nContent-Transfer-Encoding: base64" \
           b"\r\n\r\nJVBERi0xLjQK\r\n"
    for level in range(120):
        bnd = b"n%03d" % level
        node = (b"Content-Type: multipart/mixed; boundary=" + bnd + b"\r\n\r\n--" + bnd
                + b"\r\n" + node + b"\r\n--" + bnd + b"--\r\n")
    found = locate_attachments(b"Subject: deep\r\n" + node)
    assert len(found.attachments) == 1
    assert found.attachments[0].content_type == "multipart/mixed"
    assert b"JVBERi0xLjQK" in b"".join(decoded(b"Subject: deep\r\n" + node, found.parts[0]))


@pytest.mark.parametrize("raw", [
    b"From: a@b\r\nX-Caf\xe9-\xff: 1\r\nSubject: hi\r\nMessage-ID: <a@example.\xd1\x81\xd1\x80"
    b"\xd0\xb1>\r\n\r\nbody\r\n",
    b"\xef\xbb\xbfFrom: a@b\r\nSubject: hi\r\nMessage-ID: <a@example.\xd1\x81\xd1\x80\xd0\xb1>"
    b"\r\n\r\nbody\r\n",
    b"From: a@b\nSubject: hi\nnot a field\rMessage-ID: <a@example.\xd1\x81\xd1\x80\xd0\xb1>\n\nb\n",
])
def test_headers_after_a_broken_line_are_still_read(raw: bytes) -> None:
    """An 8-bit byte in a field name, a BOM or a line that is not a field made the stdlib
    end the header section there: every later field (Subject, Message-ID) was lost."""
    message = Message(raw)
    assert message.decoded_subject.startswith("hi") and message.subject.startswith("hi")
    assert message.raw_header("Message-ID") == "<a@example.срб>"
    assert message.raw == raw


@pytest.mark.parametrize("cte", ["base64", "quoted-printable"])
def test_encoded_text_holding_a_uuencoded_file_is_taken_whole(cte: str) -> None:
    import base64 as b64mod
    import quopri

    text = b"see below\r\n" + uuencode("secret.xls", b"confidential" * 50) + b"bye\r\n"
    body = (b64mod.encodebytes(text) if cte == "base64" else quopri.encodestring(text))
    raw = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
           b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n"
           + body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    found = locate_attachments(raw)
    assert [a.data for a in found.attachments] == [text]


def test_unindented_continuation_with_a_colon_is_not_a_field() -> None:
    message = Message(b"Subject: agenda\r\nmeeting at 10:00\r\nTo: c@d\r\n\r\nbody\r\n")
    assert message.raw_headers() == [("Subject", "agenda\r\n meeting at 10:00"), ("To", "c@d")]


def test_a_part_that_never_ends_its_headers_is_read_with_a_capped_field() -> None:
    """17 MB of text lines after a part's headers and no blank line: read as continuation
    lines, one field would be 17 MB, which the stdlib parses in quadratic time (a hang).
    Each field is read up to Postfix's header_size_limit, as Postfix keeps it."""
    from milters.core.mime.scan import HEADER_SIZE_LIMIT

    raw = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\nX-Long: start\r\n" + b"more text, no colon\r\n" * 50_000
           + b"--b--\r\n")
    root = scan(raw)
    [part] = root.children
    assert len(str(part.skeleton["X-Long"])) <= HEADER_SIZE_LIMIT + 1000
    assert len(Message(b"Subject: " + b"s" * 300_000 + b"\r\n\r\nb").subject) < 110_000


@pytest.mark.parametrize("value", ["multipart/mixed; boundary*", "multipart/mixed; b*0*=x; b*1*",
                                   "multipart/mixed;\r\n boundary*"])
def test_a_star_parameter_with_nothing_after_it_is_read_not_raised(value: str) -> None:
    """Found by the cut-and-splice test: the stdlib's header parser raises IndexError on a
    parameter name ending in `*` at the end of a field. Such a multipart has no boundary:
    it is read, and the attachments milter doubts it (no boundary), rather than crash."""
    raw = (f"From: a@example.jp\r\nContent-Type: {value}\r\n\r\n--x\r\n"
           "Content-Type: application/pdf\r\n\r\n%PDF-1.4\r\n--x--\r\n").encode()
    mime = Message(raw).mime_raw
    root = scan(mime)
    assert root.skeleton.get_content_type() == "multipart/mixed" and root.boundary == b""
    locate_attachments(mime, root=root)
