"""The DATA stream: what is stored and what is left for the next command must not depend on
how the bytes happen to arrive, dots are unstuffed, smuggling tricks never end the data,
limits stop the spool, and dot_stuffed() is the exact inverse for the next hop."""
from __future__ import annotations

import errno
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.smtp_in import data as smtp_data
from mta.smtp_in.header_end import with_header_ended
from mta.smtp_in.data import LONG_LINE, DataStream, dot_stuffed

BIG = 1 << 40  # "no limit" for the tests that are not about limits

# Lines made of pieces that matter here: dots (stuffing), spaces, 8-bit text, colons.
_TOKENS = st.sampled_from([b".", b"..", b"x", b"ab", b" ", b":", b"\xe3\x81\x82", b"\xff", b"\t"])
_LINE = st.lists(_TOKENS, max_size=8).map(b"".join)
_LINES = st.lists(_LINE, max_size=10)
# What a pipelining client may send right after the terminator.
_AFTER = st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@example.jp>\r\nRCPT TO:<b@example.jp>\r\n",
                          b".\r\n", b"\r\n.\r\n", b"RSET\r\nQU"])


def message_of(lines: list[bytes]) -> bytes:
    """The message as it must be stored: every line ends with CRLF."""
    return b"".join(line + b"\r\n" for line in lines)


def data_of(lines: list[bytes]) -> bytes:
    """The DATA text a correct client sends for these lines, terminator included."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


class Run:
    """A DataStream fed the way the server feeds it: the buffer grows chunk by chunk and
    feed() is called after each chunk until it reports the terminator."""

    def __init__(self, *, max_size: int = BIG, max_header_bytes: int = BIG,
                 sink_fails_at: int | None = None) -> None:
        self.pieces: list[bytes] = []
        self.calls_after_refusal = 0
        self._sink_fails_at = sink_fails_at
        self.stream = DataStream(self._sink, max_size=max_size, max_header_bytes=max_header_bytes)
        self.buf = bytearray()
        self.done = False
        self.largest_leftover = 0  # the biggest buffer a not-yet-finished feed left behind

    def _sink(self, piece: bytes) -> None:
        if self.stream.refused:
            self.calls_after_refusal += 1
        if self._sink_fails_at is not None and len(self.pieces) >= self._sink_fails_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.pieces.append(piece)

    def chunks(self, chunks: list[bytes]) -> "Run":
        for chunk in chunks:
            self.buf += chunk
            if not self.done:
                self.done = self.stream.feed(self.buf)
                if not self.done:
                    self.largest_leftover = max(self.largest_leftover, len(self.buf))
        return self

    @property
    def stored(self) -> bytes:
        return b"".join(self.pieces)

    @property
    def leftover(self) -> bytes:
        return bytes(self.buf)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=12))
    return split(data, cuts)


# -- any chunking gives the same result ----------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(lines=_LINES, after=_AFTER, data=st.data(), long_line=st.sampled_from([3, 5, 16, LONG_LINE]))
def test_any_chunking_stores_the_same_message_and_leaves_the_same_commands(
        lines: list[bytes], after: bytes, data: st.DataObject, long_line: int) -> None:
    text = data_of(lines) + after
    chunks = data.draw(chunked(text), label="chunks")
    # A small LONG_LINE makes the long-line path (a line passed on in parts) run often.
    with patch.object(smtp_data, "LONG_LINE", long_line):
        run = Run().chunks(chunks)
    assert run.done
    # The header ends at the first line that is no field (mta/smtp_in/header_end.py), wherever the
    # chunks and the long-line parts cut it.
    stored = with_header_ended(message_of(lines), limit=long_line)
    assert run.stored == stored
    assert run.leftover == after
    assert run.stream.size == len(stored)
    assert not run.stream.refused
    # Memory stays bounded: an unfinished feed keeps at most one partial line.
    assert run.largest_leftover <= long_line


@settings(max_examples=100, deadline=None)
@given(lines=_LINES, data=st.data())
def test_chunking_does_not_change_the_header_count(lines: list[bytes], data: st.DataObject) -> None:
    text = data_of([b"Subject: a", b"X-Dots: ..", *lines])
    whole = Run().chunks([text])
    run = Run().chunks(data.draw(chunked(text), label="chunks"))
    assert run.stream.header_bytes == whole.stream.header_bytes


# -- dot-unstuffing ------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks, stored", [
    ([b"..x: y\r\n.\r\n"], b".x: y\r\n"),                            # the first line
    ([b"\r\na\r\n..x\r\n..\r\n.\r\n"], b"\r\na\r\n.x\r\n.\r\n"),     # later lines, a lone dot
    ([b"\r\na\r\n.", b".x\r\n.\r\n"], b"\r\na\r\n.x\r\n"),           # split after the first dot
    ([b"\r\na\r\n", b".", b".", b"x\r\n", b".\r\n"], b"\r\na\r\n.x\r\n"),  # a byte at a time
    ([b"\r\na\r", b"\n..", b"\r\n.\r\n"], b"\r\na\r\n.\r\n"),
    ([b"\r\nx..y\r\n.\r\n"], b"\r\nx..y\r\n"),                       # dots inside a line stay
    ([b"\r\n...\r\n.\r\n"], b"\r\n..\r\n"),
])
def test_dot_unstuffing(chunks: list[bytes], stored: bytes) -> None:
    """(In a body, after the empty line: what is not a field would end the header.)"""
    run = Run().chunks(chunks)
    assert run.done and run.stored == stored and run.leftover == b""


# -- the terminator ------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [
    [b"Subject: x\r\n\r\nbody\r\n.", b"\r\n"],
    [b"Subject: x\r\n\r\nbody\r\n", b".\r\n"],
    [b"Subject: x\r\n\r\nbody\r", b"\n.\r\n"],
    [b"Subject: x\r\n\r\nbody\r\n.\r", b"\n"],
    [b"Subject: x\r\n\r\nbody", b"\r", b"\n", b".", b"\r", b"\n"],
])
def test_terminator_split_across_chunks(chunks: list[bytes]) -> None:
    run = Run()
    run.chunks(chunks[:-1])
    assert not run.done, "the data ended before the terminator was complete"
    run.chunks(chunks[-1:] + [b"QUIT\r\n"])
    assert run.done
    assert run.stored == b"Subject: x\r\n\r\nbody\r\n"
    assert run.leftover == b"QUIT\r\n"


def test_an_empty_message() -> None:
    run = Run().chunks([b".\r\nQUIT\r\n"])
    assert run.done and run.stored == b"" and run.stream.size == 0
    assert run.leftover == b"QUIT\r\n"
    assert not run.stream.refused


def test_an_unfinished_message_is_not_done() -> None:
    run = Run().chunks([b"Subject: x\r\n\r\nbody\r\n", b".x\r\n", b"..\r\n"])
    assert not run.done


@pytest.mark.parametrize("smuggled", [
    b"body\n.\nMAIL FROM:<x@evil.example>\r\n",      # LF.LF
    b"body\r\n.\nRCPT TO:<x@evil.example>\r\n",       # CRLF.LF
    b"body\n.\r\nDATA\r\n",                           # LF.CRLF
    b"body\r.\r\nQUIT\r\n",                           # CR.CRLF
    b"body\r\n.\rRSET\r\n",                           # CRLF.CR
])
def test_smuggled_terminators_neither_end_nor_pass(smuggled: bytes) -> None:
    text = b"Subject: a\r\n\r\n" + smuggled + b".\r\nNOOP\r\n"
    for size in (1, 2, 3, 7, len(text)):
        run = Run().chunks([text[i:i + size] for i in range(0, len(text), size)])
        assert run.done and run.leftover == b"NOOP\r\n", size
        assert run.stream.bare_line_end and run.stream.refused, size


# -- bare line ends ------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_LINE, min_size=1, max_size=8), data=st.data(),
       bare=st.sampled_from([b"\n", b"\r"]))
def test_a_bare_lf_or_cr_anywhere_refuses_the_message(lines: list[bytes], data: st.DataObject,
                                                      bare: bytes) -> None:
    body = data_of(lines)[:-3]  # without the final ".\r\n"
    at = data.draw(st.integers(0, len(body) - 1), label="at")
    # The CRLF before the terminator keeps it whole wherever the bare byte went.
    text = body[:at] + bare + body[at:] + b"\r\n.\r\nQUIT\r\n"
    run = Run().chunks(data.draw(chunked(text), label="chunks"))
    assert run.done, "read on to the real terminator"
    assert run.leftover == b"QUIT\r\n"
    assert run.stream.bare_line_end and run.stream.refused


# -- long lines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1000, LONG_LINE - 1, LONG_LINE + 1, 3 * LONG_LINE + 17])
def test_a_line_longer_than_long_line_is_kept_intact(chunk_size: int) -> None:
    long = b"x" * (3 * LONG_LINE + 5)
    dotted = b"." + b"y" * (LONG_LINE + 3)
    lines = [b"Subject: long", b"", long, dotted, b"end"]
    text = data_of(lines) + b"QUIT\r\n"
    run = Run().chunks([text[i:i + chunk_size] for i in range(0, len(text), chunk_size)])
    assert run.done
    assert run.stored == message_of(lines)
    assert run.leftover == b"QUIT\r\n"
    assert not run.stream.refused
    assert run.largest_leftover <= LONG_LINE


def test_a_long_line_after_a_short_one_in_the_same_buffer_is_passed_on() -> None:
    """A feed that ends with a partial line longer than LONG_LINE must pass it on: the
    server stops reading from a client with a full buffer, and would then wait forever."""
    run = Run().chunks([b"Subject: x\r\n\r\n" + b"x" * (4 * LONG_LINE)])
    assert not run.done
    assert len(run.buf) <= LONG_LINE
    run.chunks([b"\r\n.\r\n"])
    assert run.done and run.stored == b"Subject: x\r\n\r\n" + b"x" * (4 * LONG_LINE) + b"\r\n"


def test_a_long_line_ending_in_cr_at_a_chunk_end() -> None:
    long = b"z" * (LONG_LINE + 10)
    run = Run().chunks([long + b"\r", b"\n.\r\n"])
    assert run.done and run.stored == long + b"\r\n" and not run.stream.bare_line_end


# -- limits --------------------------------------------------------------------------------------
def test_the_size_limit_stops_the_spool_and_reads_to_the_end() -> None:
    lines = [b"Subject: big", b""] + [b"0123456789" * 5] * 40
    run = Run(max_size=500).chunks(split(data_of(lines) + b"QUIT\r\n", list(range(0, 3000, 97))))
    assert run.done and run.leftover == b"QUIT\r\n"
    assert run.stream.too_big and run.stream.refused
    assert len(run.stored) <= 500
    assert run.calls_after_refusal == 0


def test_a_message_of_exactly_the_size_limit_is_accepted() -> None:
    lines = [b"Subject: s", b"", b"..body"]
    limit = len(message_of(lines))
    exact = Run(max_size=limit).chunks([data_of(lines)])
    assert exact.done and not exact.stream.refused and exact.stored == message_of(lines)
    over = Run(max_size=limit - 1).chunks([data_of(lines)])
    assert over.done and over.stream.too_big


def test_the_header_limit() -> None:
    header = [b"Subject: " + b"h" * 30, b"X-A: " + b"a" * 30]
    body = [b"b" * 70] * 20
    fits = Run(max_header_bytes=100).chunks([data_of(header + [b""] + body)])
    assert fits.done and not fits.stream.refused  # the body does not count
    assert fits.stream.header_bytes == len(message_of(header))
    big = Run(max_header_bytes=60).chunks(split(data_of(header * 3 + [b""] + body),
                                                list(range(0, 2000, 13))))
    assert big.done and big.stream.header_too_big and big.stream.refused
    assert not big.stream.too_big
    assert big.calls_after_refusal == 0 and len(big.stored) <= 60


def test_a_header_without_a_body_counts_whole() -> None:
    run = Run(max_header_bytes=10).chunks([b"Subject: too long for ten\r\n.\r\n"])
    assert run.done and run.stream.header_too_big


def test_a_failing_sink_is_reported_and_not_called_again() -> None:
    lines = [b"Subject: x", b""] + [b"line"] * 50
    run = Run(sink_fails_at=1).chunks(split(data_of(lines) + b"QUIT\r\n", list(range(0, 400, 11))))
    assert run.done and run.leftover == b"QUIT\r\n"
    assert isinstance(run.stream.sink_error, OSError)
    assert run.stream.sink_error.errno == errno.ENOSPC
    assert run.stream.refused
    assert len(run.pieces) == 1 and run.calls_after_refusal == 0


# -- dot_stuffed: the outgoing side --------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dot_stuffed")


JUNK = b"\r\n.\r\nJUNK after the message\n..\r\n"


def unstuff(data: bytes) -> bytes:
    run = Run().chunks([data + b".\r\n"])
    assert run.done and run.leftover == b"" and not run.stream.refused
    return run.stored


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=_LINES, ends_with_crlf=st.booleans(), block=st.sampled_from([1, 2, 3, 5, 64 * 1024]),
       with_junk=st.booleans())
def test_dot_stuffed_round_trip(scratch: Path, lines: list[bytes], ends_with_crlf: bool,
                                block: int, with_junk: bool) -> None:
    message = b"\r\n".join(lines) + (b"\r\n" if ends_with_crlf and lines else b"")
    path = scratch / "message"
    path.write_bytes(message + (JUNK if with_junk else b""))
    size = len(message) if with_junk else None
    out = b"".join(dot_stuffed(path, size, block=block))
    assert out.endswith(b"\r\n")
    expected = message if message.endswith(b"\r\n") else message + b"\r\n"
    assert unstuff(out) == with_header_ended(expected)


@pytest.mark.parametrize("message, stuffed", [
    (b".\r\n", b"..\r\n"),
    (b"a\r\n.b\r\n..\r\n", b"a\r\n..b\r\n...\r\n"),
    (b"no end", b"no end\r\n"),
    (b"", b"\r\n"),
])
def test_dot_stuffed_examples(tmp_path: Path, message: bytes, stuffed: bytes) -> None:
    path = tmp_path / "m"
    path.write_bytes(message + JUNK)
    assert b"".join(dot_stuffed(path, len(message), block=2)) == stuffed
    assert b"".join(dot_stuffed(path, len(message))) == stuffed


@settings(max_examples=200, deadline=None)
@given(hops=st.integers(0, 8), other=st.integers(0, 4), data=st.data(),
       long_line=st.sampled_from([5, 16, LONG_LINE]))
def test_received_headers_are_counted_whatever_the_chunking(
        hops: int, other: int, data: st.DataObject, long_line: int) -> None:
    """The mail-loop check counts Received: fields of the header only, in any letter case,
    also when a field or its name is cut between two chunks."""
    header = [b"Subject: loop"] + [b"X-Other: received: not a field start"] * other
    header += [b"received: from hop%d by relay" % i if i % 2 else
               b"Received: from hop%d (unknown [192.0.2.%d])" % (i, i) for i in range(hops)]
    lines = header + [b"", b"Received: in the body, not counted", b"body"]
    text = data_of(lines)
    chunks = data.draw(chunked(text), label="chunks")
    with patch.object(smtp_data, "LONG_LINE", long_line):
        run = Run().chunks(chunks)
    assert run.done and run.stored == message_of(lines)
    assert run.stream.received_headers == hops


# -- where the header ends (mta/smtp_in/header_end.py) ---------------------------------------------
@pytest.mark.parametrize("sent, stored", [
    # A UTF-8 BOM before the first field: the header is empty, everything is body.
    (b"\xef\xbb\xbfFrom: a@example.jp\r\nSubject: x\r\n\r\nbody\r\n",
     b"\r\n\xef\xbb\xbfFrom: a@example.jp\r\nSubject: x\r\n\r\nbody\r\n"),
    # A fold that lost its indentation ends the header there.
    (b"Subject: files for the\r\nmeeting of monday\r\nX-After: 1\r\n\r\nbody\r\n",
     b"Subject: files for the\r\n\r\nmeeting of monday\r\nX-After: 1\r\n\r\nbody\r\n"),
    # A field name with a byte that is not ASCII, or a control character.
    (b"From: a@example.jp\r\nX-Caf\xe9: 1\r\n\r\nbody\r\n",
     b"From: a@example.jp\r\n\r\nX-Caf\xe9: 1\r\n\r\nbody\r\n"),
    (b"From: a@example.jp\r\nX-\x01: 1\r\n\r\nbody\r\n",
     b"From: a@example.jp\r\n\r\nX-\x01: 1\r\n\r\nbody\r\n"),
    # The body right after the header, no empty line.
    (b"Content-Type: text/plain\r\nbody right here\r\n",
     b"Content-Type: text/plain\r\n\r\nbody right here\r\n"),
    # A continuation with nothing above it would fold into our Received field.
    (b" Received: forged\r\nFrom: a@example.jp\r\n\r\nx\r\n",
     b"\r\n Received: forged\r\nFrom: a@example.jp\r\n\r\nx\r\n"),
    # What may stand in a header stays: blanks before the colon (RFC 5322 4.5), folds,
    # 8-bit values (RFC 6532), an empty value; and nothing is touched after the empty line.
    (b"Subject : x\r\nTo: a,\r\n\tb\r\nX-J: \xe6\x97\xa5\r\nX-E:\r\n\r\nno colon\r\n",
     b"Subject : x\r\nTo: a,\r\n\tb\r\nX-J: \xe6\x97\xa5\r\nX-E:\r\n\r\nno colon\r\n"),
])
def test_the_header_ends_where_postfix_ends_it(sent: bytes, stored: bytes) -> None:
    run = Run().chunks([sent + b".\r\n"])
    assert run.done and run.stored == stored
    assert (run.stream.stray_header_line is not None) == (sent != stored)
    assert with_header_ended(sent) == stored  # scan's reading of a file agrees


def test_a_stray_line_after_the_received_fields_stops_their_count() -> None:
    """Received fields in what became the body are not hops (a loop is counted in the
    header only)."""
    sent = b"Received: a\r\n\xef\xbb\xbfbroken\r\n" + b"Received: b\r\n" * 60 + b"\r\nx\r\n"
    run = Run().chunks([sent + b".\r\n"])
    assert run.stream.received_headers == 1


def test_a_long_field_passed_on_in_parts_stays_a_field() -> None:
    """A 200 KB Subject reaches the spool in parts; its name was seen in the first part,
    and the empty line after it still ends the header (no line is taken for a stray)."""
    sent = b"Subject: " + b"s" * 200_000 + b"\r\nTo: b@example.jp\r\n\r\nbody\r\n"
    run = Run().chunks([sent[i:i + 4096] for i in range(0, len(sent), 4096)] + [b".\r\n"])
    assert run.stored == sent and run.stream.stray_header_line is None


def test_delivery_breaks_lines_longer_than_smtp_allows(tmp_path: Path) -> None:
    """RFC 5321 4.5.3.1.6 (998 octets before CRLF), as Postfix's smtp_line_length_limit:
    a 200 KB Subject goes out folded (still one field, the same text once unfolded), a
    100 KB body line broken with CRLF; the rest is unchanged, dots still stuffed."""
    subject = b"Subject: " + b"s" * 200_000
    body_line = b"." + b"x" * 100_000
    message = (subject + b"\r\nTo: b@example.jp\r\n\r\nshort\r\n" + body_line + b"\r\nend\r\n")
    path = tmp_path / "m"
    path.write_bytes(message)
    out = b"".join(dot_stuffed(path, block=4096))
    lines = out.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    head, body = unstuff(out).split(b"\r\n\r\n", 1)
    assert head.replace(b"\r\n ", b"") == subject + b"\r\nTo: b@example.jp"
    assert body.replace(b"\r\n", b"") == b"short" + body_line + b"end"
    assert body.startswith(b"short\r\n.xxx") and body.endswith(b"\r\nend\r\n")


def test_a_long_field_after_a_block_of_short_ones_is_folded_not_broken(tmp_path: Path) -> None:
    """The header goes on across blocks: the long Subject read in a later block than the
    fields before it is still folded with a space."""
    message = b"From: a@example.jp\r\n" * 10 + b"Subject: " + b"w " * 5000 + b"\r\n\r\nb\r\n"
    path = tmp_path / "m"
    path.write_bytes(message)
    out = unstuff(b"".join(dot_stuffed(path, block=64)))
    head = out.split(b"\r\n\r\n", 1)[0]
    assert all(line[:1] == b" " for line in head.split(b"\r\n")[11:])
    assert head.replace(b"\r\n ", b"") == message.split(b"\r\n\r\n", 1)[0]


def test_a_line_cut_just_before_its_cr_is_judged_as_the_whole_text_judges_it() -> None:
    """`...` CR | LF (a stuffed `..`) with 3-byte long lines: the part smtpd passes on
    holds the whole line, though it cannot know it yet (hypothesis found this one)."""
    for parts in ([b"...\r", b"\n.\r\n"], [b"....\r", b"\n.\r\n"], [b"..:\r", b"\n.\r\n"]):
        with patch.object(smtp_data, "LONG_LINE", 3):
            run = Run().chunks(parts)
        assert run.stored == with_header_ended(parts[0][1:-1] + b"\r\n", limit=3), parts
