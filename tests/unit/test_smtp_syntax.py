"""MAIL FROM / RCPT TO arguments: what a real client sends is understood, and anything that
could make an address mean two things is refused with a 501."""
from __future__ import annotations

import pytest

from mta.smtp_in.syntax import PathArgument, SyntaxProblem, parse_path, split_command


def refused(arg: str, keyword: str = "FROM") -> str:
    with pytest.raises(SyntaxProblem) as caught:
        parse_path(arg, keyword)
    reply = caught.value.reply
    assert reply[:3].isdigit() and reply[3] == " ", reply  # a complete SMTP reply line
    return reply


def test_plain_path() -> None:
    assert parse_path("FROM:<a@b>", "FROM") == PathArgument("a@b", {}, [])
    assert parse_path("TO:<taro@example.jp>", "TO") == PathArgument("taro@example.jp", {}, [])


def test_space_after_the_colon_and_parameters() -> None:
    path = parse_path("FROM: <a@b> SIZE=10 BODY=8BITMIME", "FROM")
    assert path.address == "a@b"
    assert path.params == {"SIZE": "10", "BODY": "8BITMIME"}
    assert path.raw_params == ["SIZE=10", "BODY=8BITMIME"]


def test_parameter_names_are_upper_cased_and_values_kept() -> None:
    path = parse_path("FROM:<a@b> size=10 body=8bitmime SMTPUTF8", "FROM")
    assert path.params == {"SIZE": "10", "BODY": "8bitmime", "SMTPUTF8": None}
    assert path.raw_params == ["size=10", "body=8bitmime", "SMTPUTF8"]


def test_keyword_is_case_insensitive_and_null_sender() -> None:
    assert parse_path("from:<>", "FROM") == PathArgument("", {}, [])
    assert parse_path("From:<> BODY=7BIT", "FROM").params == {"BODY": "7BIT"}


def test_null_path_is_not_a_recipient() -> None:
    assert refused("TO:<>", "TO").startswith("501 5.1.3")


@pytest.mark.parametrize("arg, address, params", [
    ("FROM:a@b", "a@b", {}),
    ("FROM: a@b", "a@b", {}),
    ("FROM:a@b SIZE=10", "a@b", {"SIZE": "10"}),          # Postfix takes this too
    ("FROM:a@b SIZE=10 BODY=8BITMIME", "a@b", {"SIZE": "10", "BODY": "8BITMIME"}),
])
def test_without_angle_brackets(arg: str, address: str, params: dict[str, str]) -> None:
    path = parse_path(arg, "FROM")
    assert (path.address, path.params) == (address, params)


def test_an_empty_address_without_brackets_is_not_the_null_sender() -> None:
    assert refused("FROM:").startswith("501 ")
    assert refused("TO:", "TO").startswith("501 ")


@pytest.mark.parametrize("quoted", ['"a>b"@example.jp', '"john smith"@example.jp',
                                    '"a> <b c"@example.jp', '"x\\"> y"@example.jp'])
def test_quoted_local_part_with_angle_bracket_and_spaces(quoted: str) -> None:
    path = parse_path(f"TO:<{quoted}> NOTIFY=NEVER", "TO")
    assert path.address == quoted
    assert path.params == {"NOTIFY": "NEVER"}


@pytest.mark.parametrize("arg", ["FROM:<a@b", 'FROM:<"a>b"@c', "FROM:<a@b SIZE=1"])
def test_missing_closing_bracket(arg: str) -> None:
    assert refused(arg).startswith("501 5.1.7")


@pytest.mark.parametrize("arg, keyword", [
    ("FRM:<a@b>", "FROM"), ("FROM <a@b>", "FROM"), ("<a@b>", "FROM"), ("TO:<a@b>", "FROM"),
    ("FROM:<a@b>", "TO"), ("", "FROM"), ("FROMAGE:<a@b>", "FROM"),
])
def test_garbage_keyword(arg: str, keyword: str) -> None:
    reply = refused(arg, keyword)
    assert reply.startswith("501 5.5.4 Syntax: ")
    assert ("MAIL FROM:" if keyword == "FROM" else "RCPT TO:") in reply


@pytest.mark.parametrize("arg", [
    "FROM:<a@b>SIZE=10",          # no space after the path
    "FROM:<a@b> =10",             # no name
    "FROM:<a@b> SI_ZE=10",        # not a keyword
    "FROM:<a@b> SIZE=1 {x}=2",
    "FROM:<a@b> ＳＩＺＥ=10",        # keywords are ASCII
    "FROM:<a@b> AUTH=a\x00b",     # a NUL would split the value for a milter
    "FROM:<a@b> X-V=\x01",
])
def test_bad_parameter_syntax(arg: str) -> None:
    assert refused(arg).startswith("501 5.5.4")


@pytest.mark.parametrize("address", ["a b@c", "a@b c", "a\x00b@c", '"a\x00b"@c', '"a\rb"@c',
                                     '"a\nb"@c', '"a b"@c d', "a\x1b@c"])
def test_white_space_and_control_characters_in_an_address(address: str) -> None:
    assert refused(f"TO:<{address}>", "TO").startswith("501 5.1.7")


@pytest.mark.parametrize("line", [b"MAIL FROM:<\xff@example.jp>", b"MAIL FROM:<a@ex\xe3\x81ample.jp>",
                                  b"RCPT TO:<\xc3@example.jp>"])
def test_non_utf8_address_is_refused(line: bytes) -> None:
    verb, arg = split_command(line)
    assert verb in ("MAIL", "RCPT")
    reply = refused(arg, "FROM" if verb == "MAIL" else "TO")
    assert reply.startswith("501 5.1.7") and "UTF-8" in reply


def test_non_utf8_parameter_is_refused() -> None:
    verb, arg = split_command(b"MAIL FROM:<a@example.jp> AUTH=<\xff@x>")
    assert refused(arg).startswith("501 5.5.4")


def test_utf8_address_is_parsed() -> None:
    verb, arg = split_command("MAIL FROM:<太郎@例え.jp> SMTPUTF8".encode())
    path = parse_path(arg, "FROM")
    assert path.address == "太郎@例え.jp" and path.params == {"SMTPUTF8": None}


@pytest.mark.parametrize("line, verb, arg", [
    (b"mail FROM:<a@b>", "MAIL", "FROM:<a@b>"),
    (b"NOOP", "NOOP", ""),
    (b"EHLO   client.example  ", "EHLO", "client.example"),
    (b"rcpt to:<a@b>", "RCPT", "to:<a@b>"),
])
def test_split_command(line: bytes, verb: str, arg: str) -> None:
    assert split_command(line) == (verb, arg)
