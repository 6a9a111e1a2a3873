"""What a header looks like on the milter wire: never past the milter's packet limit, a
name always UTF-8, no NUL that would cut it short (mta/chain/wire_header.py)."""
from __future__ import annotations

from hypothesis import given, strategies as st

from mta.chain.wire_header import (DEFAULT_MAX_DATA, SMFIP_MDS_1M, SMFIP_MDS_256K, max_data_size,
                                   wire_header)


def test_a_header_exactly_at_the_limit_is_sent_whole() -> None:
    value = "x" * (DEFAULT_MAX_DATA - len("Subject") - 2)
    header = wire_header("Subject", value, DEFAULT_MAX_DATA)
    assert not header.truncated and len(header.payload) == DEFAULT_MAX_DATA
    assert header.payload == b"Subject\0" + value.encode() + b"\0"


def test_one_byte_over_is_cut_to_the_limit_keeping_the_start() -> None:
    value = "y" * (DEFAULT_MAX_DATA - len("Subject") - 1)
    header = wire_header("Subject", value, DEFAULT_MAX_DATA)
    assert header.truncated and len(header.payload) == DEFAULT_MAX_DATA
    assert header.original_size == len("Subject") + len(value)
    assert header.payload.startswith(b"Subject\0yyy") and header.payload.endswith(b"y\0")


def test_a_200kb_subject_of_multibyte_text_is_cut_on_a_character() -> None:
    header = wire_header("Subject", "漢字" * 40_000, DEFAULT_MAX_DATA)
    assert header.truncated and len(header.payload) <= DEFAULT_MAX_DATA
    name, value, rest = header.payload.split(b"\0")
    assert (name, rest) == (b"Subject", b"")
    assert value.decode("utf-8").startswith("漢字漢字")  # strict: no half character


def test_a_long_line_without_a_colon_is_cut_too() -> None:
    header = wire_header("y" * 200_000, "", DEFAULT_MAX_DATA)
    assert header.truncated and len(header.payload) <= DEFAULT_MAX_DATA


def test_a_name_that_is_not_utf8_goes_out_as_utf8() -> None:
    name = b"X-Bad\xff\xfeName".decode("utf-8", "surrogateescape")
    header = wire_header(name, "v\udce9", DEFAULT_MAX_DATA)
    wire_name, wire_value, _ = header.payload.split(b"\0")
    assert wire_name.decode("utf-8") == "X-Badÿ\xfeName"  # Latin-1 read as text
    assert wire_value == b"v\xe9"  # a value keeps its bytes (pymilter: surrogateescape)


def test_nul_never_cuts_what_the_milter_sees() -> None:
    header = wire_header("Sub\0ject", "before\0http://evil.example/", DEFAULT_MAX_DATA)
    assert header.payload == b"Sub ject\0before http://evil.example/\0"


def test_the_limit_is_what_the_milter_announced() -> None:
    assert max_data_size(0) == 65535
    assert max_data_size(SMFIP_MDS_256K) == 256 * 1024 - 1
    assert max_data_size(SMFIP_MDS_1M | SMFIP_MDS_256K) == 1024 * 1024 - 1


@given(st.binary(max_size=300), st.binary(max_size=3000), st.integers(16, 2000))
def test_any_header_fits_and_has_exactly_two_strings(name: bytes, value: bytes,
                                                     limit: int) -> None:
    header = wire_header(name.decode("utf-8", "surrogateescape"),
                         value.decode("utf-8", "surrogateescape"), limit)
    assert len(header.payload) <= limit
    parts = header.payload.split(b"\0")
    assert len(parts) == 3 and parts[2] == b""
    parts[0].decode("utf-8")  # pymilter decodes the name strictly
