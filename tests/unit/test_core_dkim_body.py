"""The one streaming DKIM body canonicalizer (milters/core/dkim_body.py) that the auth and
sign milters share: what it hands out, when, and what it refuses. That its bytes equal
dkimpy's for any body and any chunking is tested through both users
(test_auth_body_hash.py, test_sign_dkim_primitive.py)."""
from __future__ import annotations

import pytest

from milters.core.dkim_body import CanonicalBody


def canonical(canon: str, chunks: list[bytes]) -> tuple[CanonicalBody, list[bytes]]:
    out: list[bytes] = []
    body = CanonicalBody(canon, out.append)
    for chunk in chunks:
        body.feed(chunk)
    return body, out


@pytest.mark.parametrize("canon, want", [
    ("simple", b"a  b \r\n\r\n\tc\r\n"),
    ("relaxed", b"a b\r\n\r\n c\r\n"),
])
def test_bare_lfs_whitespace_and_trailing_empty_lines_come_out_canonical(
        canon: str, want: bytes) -> None:
    body, out = canonical(canon, [b"a  b \n", b"\r", b"\n\tc", b"\r\n\n\r\n"])
    body.finish()
    assert b"".join(out) == want
    assert body.length == len(want)


@pytest.mark.parametrize("canon, want", [("simple", b"\r\n"), ("relaxed", b"")])
def test_an_empty_body_is_one_crlf_simple_and_nothing_relaxed(canon: str, want: bytes) -> None:
    body, out = canonical(canon, [b"", b"\r\n\r\n"])
    body.finish()
    assert b"".join(out) == want


def test_a_big_chunk_is_handed_out_before_the_end_of_the_body() -> None:
    """Memory per body must not grow with it: all but the few bytes a later chunk can
    change is handed out at once."""
    line = b"text  with\t runs \r\n"
    body, out = canonical("relaxed", [line * 50000 + b"open line  "])
    assert b"".join(out) == b"text with runs\r\n" * 50000 + b"open line"
    body.feed(b"\r\n\r\n")  # empty lines: held back, they may be the end of the body
    assert body.length == len(b"text with runs\r\n") * 50000 + len(b"open line")
    body.finish()
    assert b"".join(out).endswith(b"open line\r\n")


def test_finishing_twice_adds_nothing_and_feeding_after_the_end_is_refused() -> None:
    body, out = canonical("simple", [b"x"])
    body.finish()
    body.finish()
    assert b"".join(out) == b"x\r\n"
    with pytest.raises(ValueError, match="after its end"):
        body.feed(b"more")


@pytest.mark.parametrize("canon", ["nowsp", "Relaxed", "", "relaxed/relaxed"])
def test_an_unknown_canonicalization_is_refused_by_name(canon: str) -> None:
    with pytest.raises(ValueError, match="not relaxed or simple"):
        CanonicalBody(canon, lambda data: None)
