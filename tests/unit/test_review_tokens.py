"""Review link tokens under attack: altered payloads, another key, a swapped action or
person, expiry, replay (the book's single-use mark), truncation, huge and non-ASCII input,
another spelling of the same signature; and the key file's rules."""
from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from milters.core.errors import ConfigError, ReviewRefused, TokenInvalid
from milters.core.review import MemoryReviewBook, new_review
from milters.core.review.tokens import (KEY_BYTES, MAX_TOKEN, issue, link, load_token_key,
                                        verify)

KEY = b"k" * 64
T0 = 1_700_000_000.0
RID = "0123456789abcdef0123456789abcdef"


def token(action: str = "approve", person: str = "boss@example.jp",
          expires: float = T0 + 3600, key: bytes = KEY, review_id: str = RID) -> str:
    return issue(key, review_id, person, action, expires)


def invalid(reason: str, value: object, **expect: object) -> None:
    with pytest.raises(TokenInvalid) as caught:
        verify(KEY, value, now=T0, **expect)  # type: ignore[arg-type]
    assert caught.value.reason == reason, caught.value


def test_a_token_says_whom_what_and_until_when() -> None:
    made = token()
    assert len(made) < 200 and all(c.isalnum() or c in "-_." for c in made)  # URL-safe
    claims = verify(KEY, made, now=T0, review_id=RID, person="Boss@Example.JP",
                    action="approve")
    assert (claims.review_id, claims.person, claims.action, claims.expires) == (
        RID, "boss@example.jp", "approve", int(T0 + 3600))
    assert len(claims.token_id) == 32
    assert verify(KEY, made, now=T0).token_id == claims.token_id  # stable
    assert token("reject") != made and verify(KEY, token("reject"), now=T0).token_id \
        != claims.token_id
    assert link("https://mail.example.jp:8026/", made) == \
        f"https://mail.example.jp:8026/review/{made}"


def test_an_altered_payload_fails_the_signature() -> None:
    head, tail = token().split(".")
    data = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    for change in ({2: "reject"}, {1: "evil@example.jp"}, {3: int(T0 + 10**8)},
                   {0: "f" * 32}):
        forged = list(data)
        for index, value in change.items():
            forged[index] = value
        new_head = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
        invalid("signature", f"{new_head}.{tail}")
    # One character of the payload flipped.
    flipped = ("B" if head[5] != "B" else "C").join((head[:5], head[6:]))
    invalid("signature", f"{flipped}.{tail}")


def test_a_token_of_another_key_or_a_swapped_signature_is_refused() -> None:
    invalid("signature", token(key=b"z" * 64))
    approve, reject = token("approve").split("."), token("reject").split(".")
    invalid("signature", f"{approve[0]}.{reject[1]}")  # reject's signature on approve


def test_a_token_for_another_action_person_or_review_is_refused() -> None:
    invalid("mismatch", token("approve"), action="reject")
    invalid("mismatch", token(person="boss@example.jp"), person="cio@example.jp")
    invalid("mismatch", token(), review_id="f" * 32)


def test_an_expired_token_is_refused_at_its_expiry() -> None:
    made = token(expires=T0 + 60)
    assert verify(KEY, made, now=T0 + 59).action == "approve"
    with pytest.raises(TokenInvalid) as caught:
        verify(KEY, made, now=T0 + 60)
    assert caught.value.reason == "expired"


@pytest.mark.parametrize("bad", [
    "", ".", "abc", "abc.", ".abc", "a.b.c", "x" * (MAX_TOKEN + 1), "é" + "a.b",
    "日本語.署名", "a b.c", "abc\r\n.def", None, 12, b"bytes.token", "%2e%2e.x",
])
def test_junk_is_malformed_never_an_exception(bad: object) -> None:
    invalid("malformed", bad)


def test_a_truncated_token_is_refused() -> None:
    made = token()
    for cut in (1, 2, 10, len(made) // 2, len(made) - 1):
        with pytest.raises(TokenInvalid):
            verify(KEY, made[:cut], now=T0)
    head, tail = made.split(".")
    with pytest.raises(TokenInvalid):
        verify(KEY, f"{head[:-4]}.{tail}", now=T0)


def test_a_huge_token_is_refused_before_any_decoding() -> None:
    invalid("malformed", "a" * 10_000_000 + "." + "b" * 43)


def test_another_spelling_of_the_same_signature_is_refused() -> None:
    # The last base64 character carries spare bits: flipping them decodes to the same bytes
    # and would be a second token_id for one link, so a second use.
    head, tail = token().split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(tail[-1])
    twin = tail[:-1] + alphabet[index ^ 1]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(tail + "=")
    invalid("malformed", f"{head}.{twin}")


def test_a_replayed_link_is_refused_by_the_book() -> None:
    book = MemoryReviewBook()
    record = book.create(new_review(queue_id="Q", kind="delay", sender="taro@example.jp",
                                    recipients=["x@partner.example"], subject="s", now=T0,
                                    timeout=300))
    made = issue(KEY, record.id, "taro@example.jp", "send_now", T0 + 300)
    claims = verify(KEY, made, now=T0 + 1, action="send_now")
    assert not book.token_used(record.id, claims.token_id)
    book.decide(claims.review_id, claims.person, "192.0.2.9", claims.action, now=T0 + 1,
                token_id=claims.token_id)
    again = verify(KEY, made, now=T0 + 2)  # still a good signature ...
    assert book.token_used(record.id, again.token_id)  # ... but spent
    with pytest.raises(ReviewRefused) as caught:
        book.decide(again.review_id, again.person, "192.0.2.9", again.action, now=T0 + 2,
                    token_id=again.token_id)
    assert caught.value.reason == "token_used"


def test_issue_refuses_what_cannot_be_a_token() -> None:
    for args in (("nothex", "a@b", "approve"), (RID, "a@b", "delete"), (RID, "", "approve"),
                 (RID, "a\r\n@b", "approve"), (RID, "a" * 400, "approve")):
        with pytest.raises(ValueError):
            issue(KEY, *args, T0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        issue(KEY, RID, "a@b", "approve", float("inf"))


def test_a_non_ascii_person_round_trips() -> None:
    claims = verify(KEY, token(person="太郎@例え.jp"), now=T0, person="太郎@例え.jp")
    assert claims.person == "太郎@例え.jp"


def test_the_key_file_is_made_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "var" / "review-token-key"
    old = os.umask(0)
    try:
        key = load_token_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) >= KEY_BYTES
    assert load_token_key(path) == key  # not replaced on the next start


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o666])
def test_a_key_file_group_or_others_may_read_or_write_is_refused(tmp_path: Path,
                                                                 mode: int) -> None:
    path = tmp_path / "key"
    path.write_text("x" * 64)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=r"review.token_key_file .* group or others.*chmod"):
        load_token_key(path)


def test_a_short_or_odd_key_file_is_refused_clearly(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="fewer than"):
        load_token_key(short)
    with pytest.raises(ConfigError, match="not a regular file|Is a directory"):
        load_token_key(tmp_path)
