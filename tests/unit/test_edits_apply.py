"""End-of-message edits applied with Postfix's semantics."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from milters.core.edits import (AddHeader, AddRecipient, ChangeFrom, ChangeHeader,
                                DeleteRecipient, Quarantine, ReplaceBody)
from mta.edits_apply import Transit, apply_edits, join_message, split_message

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
