"""End-of-message edits applied with Postfix's semantics."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from milters.core.edits import (AddHeader, AddRecipient, ChangeFrom, ChangeHeader,
                                DeleteRecipient, Quarantine, ReplaceBody)
from mta.chain.edits_apply import Transit, apply_edits, join_message, split_message

RAW = (b"Received: from a\r\n\tby b\r\n"
       b"Subject: first\r\n"
       b"X-Tag: one\r\n"
       b"x-tag: two\r\n"
       b"\r\n"
       b"body line\r\n")


def transit() -> Transit:
    return Transit(RAW, "sender@outside.example", [("taro@example.jp", None),
                                                   ("gone@example.jp", None)])


def headers(message: Transit) -> list[bytes]:
    return split_message(message.raw)[0]


def test_split_keeps_folded_fields_whole_and_round_trips() -> None:
    fields, body = split_message(RAW)
    assert fields[0] == b"Received: from a\r\n\tby b\r\n"
    assert body == b"body line\r\n"
    assert join_message(fields, body) == RAW


def test_addheader_appends_and_insheader_inserts_at_index() -> None:
    out = apply_edits(transit(), [AddHeader("X-End", "last"), AddHeader("X-Top", "first", 0),
                                  AddHeader("X-Second", "2nd", 1), AddHeader("X-Far", "far", 99)])
    names = [f.split(b":")[0] for f in headers(out)]
    assert names == [b"X-Top", b"X-Second", b"Received", b"Subject", b"X-Tag", b"x-tag",
                     b"X-End", b"X-Far"]


def test_chgheader_index_counts_that_name_any_case_and_empty_deletes() -> None:
    out = apply_edits(transit(), [ChangeHeader("X-TAG", 2, "changed"),
                                  ChangeHeader("Subject", 1, ""),
                                  ChangeHeader("X-Missing", 1, "added")])
    assert headers(out) == [b"Received: from a\r\n\tby b\r\n", b"X-Tag: one\r\n",
                            b"X-TAG: changed\r\n", b"X-Missing: added\r\n"]


def test_deleting_a_header_that_is_not_there_changes_nothing() -> None:
    assert apply_edits(transit(), [ChangeHeader("X-Tag", 3, "")]).raw == RAW


def test_leading_space_milters_bring_their_own_space_and_folding_gets_crlf() -> None:
    out = apply_edits(transit(), [AddHeader("Authentication-Results", " mx; dkim=none\n\tmore",
                                            0)], leading_space=True)
    assert headers(out)[0] == b"Authentication-Results: mx; dkim=none\r\n\tmore\r\n"


def test_envelope_body_and_quarantine_edits() -> None:
    out = apply_edits(transit(), [AddRecipient("added@example.jp"),
                                  AddRecipient("TARO@example.jp"),  # already there
                                  AddRecipient("par@example.jp", "NOTIFY=NEVER"),
                                  DeleteRecipient("<Gone@Example.jp>"),
                                  ChangeFrom("new@example.jp"),
                                  ReplaceBody(b"new body\r\n"),
                                  Quarantine("held for review")])
    assert out.recipients == [("taro@example.jp", None), ("added@example.jp", None),
                              ("par@example.jp", "NOTIFY=NEVER")]
    assert out.sender == "new@example.jp"
    assert split_message(out.raw)[1] == b"new body\r\n"
    assert out.quarantine == "held for review"


@given(st.lists(st.sampled_from([b"A: 1\r\n", b"b: 2\r\n", b"A: 3\r\n \r\n  cont\r\n"]),
                max_size=6), st.binary(max_size=40).map(lambda b: b.replace(b"\r\n\r\n", b"")))
def test_split_and_join_are_inverse(fields: list[bytes], body: bytes) -> None:
    raw = b"".join(fields) + b"\r\n" + body
    assert join_message(*split_message(raw)) == raw or not fields


# -- a large text in a file: the same edits, written to a new file, never built in memory ----
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mta.chain import message_text  # noqa: E402
from mta.chain.message_text import MessageText, NewBody  # noqa: E402

BIG_BODY = b"".join(b"line %07d of a body past the in-memory limit\r\n" % n
                    for n in range(4000))  # ~190 KB


def on_disk(tmp_path: Path, raw: bytes) -> Transit:
    path = tmp_path / "incoming.msg"
    path.write_bytes(raw)
    return Transit(MessageText(path=str(path), size=len(raw)), "sender@outside.example",
                   [("taro@example.jp", None)], workdir=str(tmp_path))


EDITS = [AddHeader("X-End", "last"), AddHeader("X-Top", "first", 0),
         ChangeHeader("X-TAG", 2, "changed"), ChangeHeader("Subject", 1, "")]


def test_a_file_backed_message_gets_the_same_edits_in_a_new_file(tmp_path: Path) -> None:
    raw = RAW + BIG_BODY
    in_memory = apply_edits(Transit(raw, "s@outside.example"), EDITS)
    out = apply_edits(on_disk(tmp_path, raw), EDITS)
    assert out.text.data is None and out.text.path in out.scratch  # a file of the chain's
    assert out.raw == in_memory.raw
    assert (tmp_path / "incoming.msg").read_bytes() == raw  # the received text is untouched
    out.remove_scratch()
    assert os.listdir(tmp_path) == ["incoming.msg"]


def test_envelope_edits_alone_leave_the_text_as_it_is(tmp_path: Path) -> None:
    message = on_disk(tmp_path, RAW + BIG_BODY)
    out = apply_edits(message, [AddRecipient("added@example.jp"), Quarantine("held")])
    assert out.text is message.text and out.scratch == []


def test_a_large_new_body_from_a_file_replaces_the_body_a_piece_at_a_time(tmp_path: Path) -> None:
    new = NewBody(str(tmp_path))
    for start in range(0, len(BIG_BODY), 65535):
        new.append(BIG_BODY[start:start + 65535])
    body = new.result()
    assert not isinstance(body, bytes)  # spilled to an unnamed file, not kept in memory
    assert os.listdir(tmp_path) == []  # unnamed: nothing to clean up
    out = apply_edits(on_disk(tmp_path, RAW), [ReplaceBody(body), AddHeader("X-New", "1")])
    new.close()
    assert out.raw == RAW[:-len(b"\r\nbody line\r\n")] + b"X-New: 1\r\n\r\n" + BIG_BODY


def test_a_small_new_body_stays_bytes_and_an_empty_one_still_replaces() -> None:
    small = NewBody(None)
    small.append(b"short\r\n")
    assert small.result() == b"short\r\n"
    empty = NewBody(None)
    empty.append(b"")
    assert empty.received and empty.result() == b""


@pytest.mark.parametrize("cut", [-3, -2, -1, 0, 1, 2])
def test_the_end_of_the_header_is_found_across_read_blocks(tmp_path: Path, cut: int,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The empty line may straddle two reads of the file's head."""
    monkeypatch.setattr(message_text, "_HEAD_BLOCK", 16)
    head = b"Subject: " + b"s" * (30 + cut) + b"\r\n"
    raw = head + b"\r\nbody\r\n\r\nmore\r\n"
    fields, start = on_disk(tmp_path, raw).text.head()
    assert (fields, start) == ([head], len(head) + 2)
    assert b"".join(on_disk(tmp_path, raw).text.body(start)) == b"body\r\n\r\nmore\r\n"


def test_a_text_without_an_empty_line_is_all_header(tmp_path: Path) -> None:
    raw = b"A: 1\r\nB: 2\r\n"
    fields, start = on_disk(tmp_path, raw).text.head()
    assert (fields, start) == (split_message(raw)[0], len(raw))


def test_the_body_is_read_in_chunks_of_at_most_65535_bytes(tmp_path: Path) -> None:
    raw = RAW + BIG_BODY
    text = on_disk(tmp_path, raw).text
    _, start = text.head()
    pieces = list(text.body(start))
    assert [len(p) for p in pieces[:-1]] == [65535] * (len(pieces) - 1)
    assert b"".join(pieces) == raw[start:]


def test_the_kernel_copy_falls_back_to_reads_where_copy_file_range_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(18, "Invalid cross-device link")  # EXDEV
    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = apply_edits(on_disk(tmp_path, RAW + BIG_BODY), [AddHeader("X-End", "last")])
    assert out.raw == apply_edits(Transit(RAW + BIG_BODY, "s@o.example"),
                                  [AddHeader("X-End", "last")]).raw


@pytest.mark.parametrize("on_file", [False, True])
def test_a_message_without_a_header_gets_its_new_fields_above_the_body(
        tmp_path: Path, on_file: bool) -> None:
    """smtpd ended the header before a stray first line (a BOM): the header is empty, the
    whole text is body. A milter's new fields go on top, not after the first blank line
    of the body."""
    raw = b"\r\n\xef\xbb\xbfFrom: a@example.jp\r\nSubject: s\r\n\r\nbody\r\n"
    transit = on_disk(tmp_path, raw) if on_file else Transit(raw, "s@outside.example")
    out = apply_edits(transit, [AddHeader("MIME-Version", "1.0"),
                                AddHeader("X-Top", "first", 0)]).raw
    assert out == b"X-Top: first\r\nMIME-Version: 1.0\r\n" + raw
