"""Password notices and notes: the texts Japanese and English readers get, byte for byte."""
from __future__ import annotations

import base64
import logging
import re
from datetime import datetime, timedelta, timezone
from email import policy
from email.message import Message as StdMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from milters.core.errors import ConfigError
from milters.core.jis import decode_cp50220
from milters.core.message import decode_words
from milters.attachments.notice import (KINDS, SHIPPED_DIR, Template, TemplateError,
                                        build_notice, check_template, format_date,
                                        format_files, format_links, format_recipients,
                                        load_template, note_part, parse_template, render)

JST = timezone(timedelta(hours=9))
PASSWORD = "Ab3#xY9k"
WINDOWS_TEXT = "①見積書 ㈱髙橋商事"


def ja_values(**extra: str) -> dict[str, str]:
    values = {
        "subject": f"{WINDOWS_TEXT} のご送付",
        "date": format_date("Wed, 01 May 2024 01:30:00 +0000", "ja", tz=JST),
        "password": PASSWORD,
        "recipients": format_recipients(["takahashi@example.co.jp", "sato@example.jp"]),
        "filename": "①見積書.zip",
        "sender": "髙橋 <takahashi@example.co.jp>",
    }
    values.update(extra)
    return values


def notice(lang: str = "ja", values: dict[str, str] | None = None, **kwargs: object) -> bytes:
    arguments: dict[str, object] = dict(
        template=load_template("password", lang), values=values or ja_values(),
        from_addr="postmaster@gw.example.jp", to_addrs=["takahashi@example.co.jp"],
        original_message_id="<orig.1@example.co.jp>", original_references=None,
        hostname="gw.example.jp", date=datetime(2024, 5, 1, 10, 31, tzinfo=JST))
    arguments.update(kwargs)
    return build_notice(**arguments)  # type: ignore[arg-type]


def parse(data: bytes) -> StdMessage:
    # compat32 leaves header values raw, so the test decodes them the way mailmoat does.
    return BytesParser(policy=policy.compat32).parsebytes(data)


def header_block(data: bytes) -> str:
    return data.split(b"\r\n\r\n", 1)[0].decode("ascii")


def raw_body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


# ---------------------------------------------------------------- templates

@pytest.mark.parametrize("lang", ["ja", "en"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_shipped_template_loads_and_is_clean(kind: str, lang: str) -> None:
    template = load_template(kind, lang)
    assert check_template(template) == []
    assert Path(template.source).parent == SHIPPED_DIR
    # Whole notice mails have a Subject line; notes that go into a message have none.
    assert bool(template.subject) == (kind in ("password", "offload-password"))


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_render_fills_every_placeholder(lang: str) -> None:
    subject, body = render(load_template("password", lang), ja_values())
    assert subject.endswith(f"{WINDOWS_TEXT} のご送付")
    for value in (PASSWORD, "①見積書.zip", "sato@example.jp", "2024年5月1日(水) 10:30"):
        assert value in body
    assert "{" not in body and "}" not in body


def test_render_ja_password_notice_reads_as_written() -> None:
    subject, body = render(load_template("password", "ja"), ja_values())
    assert subject == f"【パスワードのお知らせ】{WINDOWS_TEXT} のご送付"
    assert f"■パスワード\n  {PASSWORD}\n" in body
    # The recipient list keeps the indent of its placeholder on every line.
    assert "    takahashi@example.co.jp\n    sato@example.jp\n" in body


def test_render_en_notes() -> None:
    _, offload = render(load_template("offload-note", "en"), {
        "links": format_links([("a.pdf", "https://dl.example.jp/x1"),
                               ("b.xlsx", "https://dl.example.jp/x2")]),
        "expires": format_date(datetime(2024, 5, 8, 0, 0, tzinfo=timezone.utc), "en", tz=JST),
        "sender": "sato@example.jp"})
    assert "  a.pdf <https://dl.example.jp/x1>\n  b.xlsx <https://dl.example.jp/x2>" in offload
    assert "Wed, 8 May 2024 09:00" in offload
    _, deleted = render(load_template("deleted-note", "ja"), {
        "files": format_files([("run.exe", "application/x-msdownload", 1025),
                               ("tiny.bat", "text/plain", 10)])})
    assert "  run.exe (application/x-msdownload, 2 KB)\n  tiny.bat (text/plain, 1 KB)" in deleted


def test_value_holding_a_placeholder_is_not_expanded_again() -> None:
    _, body = render(load_template("password", "en"),
                     ja_values(subject="see {password}", filename="{password}.zip"))
    assert "{password}.zip" in body
    assert body.count(PASSWORD) == 1


def test_missing_values_become_empty_and_unknown_values_are_ignored() -> None:
    template = parse_template("Subject: x {subject}\n\n[{filename}] {sender}", "password",
                              "en", "t.txt")
    assert render(template, {"sender": "a@b", "nonsense": "x"}) == ("x ", "[] a@b")


def test_doubled_braces_are_literal() -> None:
    template = parse_template("{{not a placeholder}} {files}", "deleted-note", "en", "t.txt")
    assert check_template(template) == []
    assert render(template, {"files": "f"}) == ("", "{not a placeholder} f")


def test_unknown_placeholder_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "password.en.txt").write_text(
        "Subject: {subject}\n\nHello\nYour code: {pasword}\n", encoding="utf-8")
    with pytest.raises(TemplateError) as caught:
        load_template("password", "en", tmp_path)
    assert isinstance(caught.value, ConfigError)
    [problem] = caught.value.problems
    assert problem.startswith(f"{tmp_path / 'password.en.txt'}:4: unknown placeholder {{pasword}}")


def test_unbalanced_braces_and_missing_subject_are_reported() -> None:
    problems = check_template(parse_template("Dear {sender\n\n}{password}", "password",
                                             "en", "p.txt"))
    assert problems[0].startswith("p.txt:1: the password notice must start with a 'Subject:")
    assert any(p.startswith("p.txt:1: unbalanced '{'") for p in problems)
    assert any(p.startswith("p.txt:3: unbalanced '}'") for p in problems)


def test_subject_placeholder_errors_point_at_line_one() -> None:
    problems = check_template(parse_template("Subject: {files}\n\nbody", "password", "ja",
                                             "p.txt"))
    assert [p.split(" (")[0] for p in problems] == ["p.txt:1: unknown placeholder {files}"]


def test_policy_directory_overrides_only_its_own_files(tmp_path: Path) -> None:
    (tmp_path / "password.ja.txt").write_text(
        "\ufeffSubject: 社内通知 {subject}\r\n\r\nパスワード：{password}\r\n", encoding="utf-8")
    own = load_template("password", "ja", tmp_path)
    assert own.source == str(tmp_path / "password.ja.txt")
    assert (own.subject, own.body) == ("社内通知 {subject}", "パスワード：{password}")
    for kind, lang in (("password", "en"), ("encrypted-note", "ja")):
        assert Path(load_template(kind, lang, tmp_path).source).parent == SHIPPED_DIR


def test_missing_directory_unknown_kind_and_bad_language_are_errors(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does not exist"):
        load_template("password", "ja", tmp_path / "nowhere")
    with pytest.raises(TemplateError, match="unknown template kind"):
        load_template("pasword", "ja")
    with pytest.raises(TemplateError, match="language"):
        load_template("password", "../ja")
    with pytest.raises(TemplateError, match="no template password.fr.txt"):
        load_template("password", "fr", tmp_path)


def test_template_not_in_utf8_is_reported(tmp_path: Path) -> None:
    (tmp_path / "deleted-note.ja.txt").write_bytes("削除しました {files}".encode("cp932"))
    with pytest.raises(TemplateError, match="not UTF-8"):
        load_template("deleted-note", "ja", tmp_path)


# ---------------------------------------------------------------- the ja notice

def test_ja_notice_decodes_back_to_the_rendered_text() -> None:
    values = ja_values()
    subject, body = render(load_template("password", "ja"), values)
    data = notice(values=values)
    parsed = parse(data)
    assert parsed["Content-Type"] == "text/plain; charset=ISO-2022-JP"
    assert parsed["Content-Transfer-Encoding"] == "7bit"
    assert decode_words(parsed["Subject"]) == subject
    decoded = decode_cp50220(parsed.get_payload(decode=True))
    assert decoded == body.replace("\n", "\r\n") + "\r\n"
    for text in ("①", "㈱", "髙", PASSWORD):
        assert text in decoded


def test_ja_body_lines_are_7bit_and_end_in_ascii() -> None:
    data = notice()
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only, no bare LF or CR
    lines = raw_body(data).split(b"\r\n")
    assert any(b"\x1b$B" in line for line in lines)
    for line in lines:
        assert all(byte < 0x80 for byte in line)
        assert line.rfind(b"\x1b$B") < line.rfind(b"\x1b(B") or b"\x1b$B" not in line


def test_ja_subject_is_folded_into_short_complete_words() -> None:
    long_subject = "【至急】" + WINDOWS_TEXT * 6 + " Re: 御見積の件"
    values = ja_values(subject=long_subject)
    expected, _ = render(load_template("password", "ja"), values)
    head = header_block(notice(values=values))
    subject_lines = re.search(r"^Subject: .*?(?=\r\n\S)", head, re.M | re.S).group(0)
    lines = subject_lines.split("\r\n")
    assert len(lines) > 2
    assert all(len(line) <= 76 for line in lines)
    words = re.findall(r"=\?[^?]+\?B\?[^?]*\?=", subject_lines)
    assert len(words) == len(lines)
    for word in words:
        assert len(word) <= 75 and word.startswith("=?ISO-2022-JP?B?")
        assert decode_words(word)  # each word decodes on its own
        payload = base64.b64decode(word[16:-2])
        assert payload.rfind(b"\x1b$B") < payload.rfind(b"\x1b(B") or b"\x1b$B" not in payload
    assert decode_words(subject_lines[len("Subject: "):]) == expected


def test_half_width_kana_go_out_full_width() -> None:
    values = ja_values(filename="ｶﾞｲﾄﾞ.zip")
    body = decode_cp50220(parse(notice(values=values)).get_payload(decode=True))
    assert "ガイド.zip" in body


def test_ja_text_iso_2022_jp_cannot_carry_falls_back_to_utf8() -> None:
    values = ja_values(subject="資料 🍣", filename="𠮷野家.zip")
    subject, body = render(load_template("password", "ja"), values)
    parsed = parse(notice(values=values))
    assert parsed["Subject"].startswith("=?UTF-8?B?")
    assert decode_words(parsed["Subject"]) == subject
    assert parsed.get_content_charset() == "utf-8"
    assert parsed.get_payload(decode=True).decode("utf-8") == body.replace("\n", "\r\n") + "\r\n"


# ---------------------------------------------------------------- headers

def test_notice_headers() -> None:
    data = notice(loop_header=("X-Mailmoat-Notice", "password"))
    parsed = parse(data)
    assert parsed["From"] == "postmaster@gw.example.jp"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["X-Mailmoat-Notice"] == "password"
    assert parsed["MIME-Version"] == "1.0"
    assert parsed["Date"] == "Wed, 01 May 2024 10:31:00 +0900"
    assert re.fullmatch(r"<[^<>@\s]+@gw\.example\.jp>", parsed["Message-ID"])
    assert parse(notice())["Message-ID"] != parsed["Message-ID"]


def test_notice_goes_to_every_recipient() -> None:
    to = [f"user{n}@example.co.jp" for n in range(6)]
    parsed = parse(notice(to_addrs=to))
    assert [a.strip() for a in decode_words(parsed["To"]).split(",")] == to
    assert all(len(line) <= 78 for line in header_block(notice(to_addrs=to)).split("\r\n"))


def test_in_reply_to_and_references_without_original_references() -> None:
    parsed = parse(notice(original_message_id="<orig.1@example.co.jp>",
                          original_references=None))
    assert parsed["In-Reply-To"] == "<orig.1@example.co.jp>"
    assert parsed["References"] == "<orig.1@example.co.jp>"


def test_references_append_the_original_message_id() -> None:
    earlier = " ".join(f"<thread.{n}.abcdefghij@example.co.jp>" for n in range(4))
    data = notice(original_message_id="<orig.1@example.co.jp>",
                  original_references=earlier.replace(" ", "\r\n "))
    parsed = parse(data)
    assert parsed["In-Reply-To"] == "<orig.1@example.co.jp>"
    assert decode_words(parsed["References"]).split() == earlier.split() + [
        "<orig.1@example.co.jp>"]
    assert all(len(line) <= 78 for line in header_block(data).split("\r\n"))


def test_no_original_message_id_means_no_in_reply_to() -> None:
    parsed = parse(notice(original_message_id=None, original_references=None))
    assert parsed["In-Reply-To"] is None and parsed["References"] is None
    parsed = parse(notice(original_message_id=None, original_references="<a@b.jp>"))
    assert parsed["In-Reply-To"] is None and parsed["References"] == "<a@b.jp>"


def test_values_cannot_inject_headers() -> None:
    values = ja_values(subject="hi\r\nBcc: victim@example.jp")
    data = notice("en", values=values, loop_header=("X-Mailmoat-Notice", "pw\r\nBcc: x@y"))
    assert "Bcc" not in parse(data).keys()


def test_bad_hostname_and_empty_recipients_are_refused() -> None:
    with pytest.raises(ValueError):
        notice(hostname="gw example")
    with pytest.raises(ValueError):
        notice(to_addrs=[])


# ---------------------------------------------------------------- the en notice

def test_en_notice_in_utf8_decodes_back() -> None:
    values = ja_values(subject="Résumé – Q3 ① ㈱", sender="Zoë <zoe@example.com>")
    subject, body = render(load_template("password", "en"), values)
    data = notice("en", values=values)
    assert all(byte < 0x80 for byte in data)
    parsed = parse(data)
    assert parsed.get_content_charset() == "utf-8"
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert decode_words(parsed["Subject"]) == subject
    for word in re.findall(r"=\?[^?]+\?B\?[^?]*\?=", parsed["Subject"]):
        assert len(word) <= 75 and word.startswith("=?UTF-8?B?")
    assert parsed.get_payload(decode=True).decode("utf-8") == body.replace("\n", "\r\n") + "\r\n"
    assert PASSWORD in body


def test_plain_ascii_en_notice_stays_readable() -> None:
    values = {"subject": "Quarterly report", "password": PASSWORD, "filename": "report.zip"}
    data = notice("en", values=values)
    parsed = parse(data)
    assert parsed["Subject"] == "Password for the attachment: Quarterly report"
    assert parsed["Content-Transfer-Encoding"] == "7bit"
    assert f"  {PASSWORD}\r\n".encode() in raw_body(data)


# ---------------------------------------------------------------- note parts

def test_ja_note_part_keeps_windows_characters() -> None:
    template = load_template("encrypted-note", "ja")
    values = {"filename": "①見積書.zip", "sender": "髙橋 <takahashi@example.co.jp>"}
    _, body = render(template, values)
    part = note_part(template, values)
    assert part.get_content_type() == "text/plain"
    assert part.get_content_charset() == "iso-2022-jp"
    assert part["Content-Transfer-Encoding"] == "7bit"
    assert decode_cp50220(part.get_payload(decode=True)) == body + "\n"
    wire = part.as_bytes(policy=policy.SMTP)
    assert all(byte < 0x80 for byte in wire) and b"\x1b$B" in wire


def test_en_note_part_is_utf8() -> None:
    template = load_template("deleted-note", "en")
    values = {"files": format_files([("naïve.exe", "application/x-msdownload", 2048)])}
    _, body = render(template, values)
    part = note_part(template, values)
    assert part.get_content_charset() == "utf-8"
    assert part.get_payload(decode=True).decode("utf-8") == body + "\n"


def test_format_date_handles_bad_input() -> None:
    assert format_date("not a date", "ja") == "not a date"
    assert format_date(None, "en") == ""
    assert format_date("Tue, 30 Apr 2024 23:59:00 -0200", "ja", tz=JST) == "2024年5月1日(水) 10:59"


def test_template_is_frozen() -> None:
    template = load_template("password", "en")
    with pytest.raises(AttributeError):
        template.body = "x"  # type: ignore[misc]
    assert isinstance(template, Template)


def test_a_non_ascii_identifier_is_left_out_not_a_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    """`<x@example.срб>` (RFC 6532 mail): the notice is plain ASCII mail sent without
    SMTPUTF8, so the identifier is left out of In-Reply-To and References, and logged."""
    caplog.set_level(logging.INFO)
    data = notice(original_message_id="<x@example.срб>",
                  original_references="<a@example.jp> <b@例え.jp>\r\n <c@example.jp>")
    parsed = parse(data)
    assert data.isascii()
    assert parsed["In-Reply-To"] is None
    assert parsed["References"] == "<a@example.jp> <c@example.jp>"
    assert "event=notice_id_dropped" in caplog.text and "count=2" in caplog.text
