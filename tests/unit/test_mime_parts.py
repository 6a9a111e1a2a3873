"""Finding attachments and their real names: the samples, every historic way Japanese clients
write a file name, and malformed MIME that must give what it can rather than a traceback."""
from __future__ import annotations

import base64
import io
import zipfile
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milters.core.mime.parts import Attachment, find_attachments
from milters.core.jis import encode_cp50220
from tests.conftest import ROOT

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
LONG_NAME = ("長いファイル名" * 43)[:296] + ".pdf"
CUSTOMER_CSV = ("顧客コード,会社名,担当者,電話番号\r\n"
                "C0012,㈱髙山製作所,髙山 一郎,03-1234-5678\r\n"
                "C0047,㈲丸﨑商店,﨑田 花子,06-2345-6789\r\n"
                "C0103,株式会社みなと物流,港 太郎,045-345-6789\r\n").encode("cp932")
BUDGET_V1 = "項目,金額\r\n保守費,1200000\r\nライセンス,480000\r\n".encode("cp932")
BUDGET_V2 = "項目,金額\r\n保守費,1150000\r\nライセンス,480000\r\n予備費,50000\r\n".encode("cp932")


def parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def sample(name: str) -> EmailMessage:
    return parse((ROOT / "samples" / name).read_bytes())


def summary(found: list[Attachment]) -> list[tuple[str, str, int, bool]]:
    return [(a.filename, a.content_type, a.size, a.is_message) for a in found]


def single(headers: str, body: bytes = b"aGVsbG8=\r\n", *, raw_headers: bytes = b"") -> Attachment:
    """The one attachment of a multipart/mixed whose second part has `headers`."""
    raw = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nbody\r\n--b\r\n"
           + headers.replace("\n", "\r\n").encode("ascii") + raw_headers
           + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body + b"\r\n--b--\r\n")
    [found] = find_attachments(parse(raw))
    return found


# --- the samples -------------------------------------------------------------------------

def test_rfc2231_continuations_and_rfc2047_names_with_windows_extensions() -> None:
    found = find_attachments(sample("attach-ja-rfc2231.eml"))
    assert summary(found) == [
        ("①御見積書_㈱髙山製作所様.pdf", "application/pdf", 569, False),
        ("顧客リスト.csv", "text/csv", len(CUSTOMER_CSV), False),
    ]
    assert found[1].data == CUSTOMER_CSV
    assert found[0].data.startswith(b"%PDF-1.4\n") and found[0].data.endswith(b"%%EOF\n")


def test_raw_shift_jis_names_and_duplicates_are_reported_as_they_are() -> None:
    found = find_attachments(sample("attach-ja-sjis-raw.eml"))
    # 表 is 0x95 0x5C in Shift_JIS: the trail byte must not be read as a quoted-pair.
    assert summary(found) == [
        ("ソフト保守_予算表.csv", "application/octet-stream", len(BUDGET_V1), False),
        ("ソフト保守_予算表.csv", "application/vnd.ms-excel", len(BUDGET_V2), False),
    ]
    assert [a.data for a in found] == [BUDGET_V1, BUDGET_V2]


def test_inline_image_is_body_unless_asked_for() -> None:
    message = sample("attach-html-inline.eml")
    found = find_attachments(message)
    assert summary(found) == [("発注書_2026年12月.xlsx", XLSX, 1728, False)]
    with zipfile.ZipFile(io.BytesIO(found[0].data)) as archive:
        assert "制御基板" in archive.read("xl/worksheets/sheet1.xml").decode()
    with_images = find_attachments(message, inline_images=True)
    assert summary(with_images) == [("logo.png", "image/png", 74, False),
                                    ("発注書_2026年12月.xlsx", XLSX, 1728, False)]
    assert with_images[0].data.startswith(b"\x89PNG\r\n\x1a\n")


def test_forwarded_message_is_one_eml_named_after_its_subject() -> None:
    raw = (ROOT / "samples" / "attach-forward.eml").read_bytes()
    found = find_attachments(parse(raw))
    assert summary(found) == [
        ("Re: 基幹システム更改 移行スケジュールの件.eml", "message/rfc822", 627, True),
        ("議事録_第3回定例_20261127.docx", DOCX, 1094, False),
    ]
    # The embedded message comes back byte for byte (the CRLF before the boundary is the
    # boundary's), so the .eml in the ZIP is what the sender forwarded.
    start = raw.index(b"From: =?ISO-2022-JP")
    assert found[0].data == raw[start:raw.index(b"\r\n--_004_", start)]
    with zipfile.ZipFile(io.BytesIO(found[1].data)) as archive:
        assert "議事録" in archive.read("word/document.xml").decode()


def test_winmail_dat_is_an_ordinary_attachment() -> None:
    found = find_attachments(sample("attach-winmail.eml"))
    assert summary(found) == [("winmail.dat", "application/ms-tnef", 176, False)]
    assert found[0].data[:4] == (0x223E9F78).to_bytes(4, "little")  # the TNEF signature


def test_hostile_names_are_decoded_but_not_sanitised() -> None:
    found = find_attachments(sample("attach-hostile.eml"))
    assert summary(found) == [
        ("../../etc/passwd", "application/octet-stream", 32, False),
        ("a\x00b.txt", "text/plain", 16, False),
        (LONG_NAME, "application/pdf", 558, False),
        ("empty.dat", "application/octet-stream", 0, False),
        ("invoice_scan.png", "image/png", 136, False),
    ]
    assert len(found[2].filename) == 300  # UTF-8 continuations cut inside characters
    assert found[0].data == b"root:x:0:0:root:/root:/bin/bash\n"
    assert found[3].data == b""
    assert found[4].data.startswith(b"MZ")  # the declared type lies; the caller must sniff


@pytest.mark.parametrize("name", ["plain-en.eml", "plain-ja-iso2022jp.eml", "newsletter-bulk.eml"])
def test_messages_without_files_have_no_attachments(name: str) -> None:
    assert find_attachments(sample(name)) == []
    assert find_attachments(sample(name), inline_images=True) == []


def test_parts_are_the_nodes_of_the_callers_tree() -> None:
    message = sample("attach-ja-sjis-raw.eml")
    found = find_attachments(message)
    payload = message.get_payload()
    assert isinstance(payload, list)
    assert all(any(a.part is node for node in payload) for a in found)
    payload.remove(found[0].part)  # the caller can take a part out by identity
    assert [a.data for a in find_attachments(message)] == [BUDGET_V2]


# --- file names ----------------------------------------------------------------------------

@pytest.mark.parametrize("headers, expected", [
    # RFC 2231 in UTF-8, and in ISO-2022-JP with a language, both with Windows extensions
    ("Content-Type: application/pdf\nContent-Disposition: attachment;"
     " filename*=UTF-8''%E2%91%A0%E3%88%B1%E9%AB%99.pdf", "①㈱髙.pdf"),
    ("Content-Type: application/pdf\nContent-Disposition: attachment;"
     " filename*=iso-2022-jp'ja'%1B%24B-%21-j%7Cb%1B%28B.pdf", "①㈱髙.pdf"),
    # continuations: encoded and literal pieces, out of order, a character split in two
    ("Content-Type: application/pdf\nContent-Disposition: attachment;\n"
     " filename*1*=%A0%E3%88%B1;\n filename*0*=UTF-8''%E2%91;\n filename*2=_100%.pdf",
     "①㈱_100%.pdf"),
    ("Content-Type: application/pdf\nContent-Disposition: attachment;\n"
     ' filename*0="report_";\n filename*1="2026.pdf"', "report_2026.pdf"),
    # RFC 2047 inside the quotes, split in two words
    ("Content-Type: application/pdf;\n name=\"=?ISO-2022-JP?B?GyRCLSEbKEI=?=\n"
     " =?ISO-2022-JP?B?GyRCfGIbKEI=?=.pdf\"", "①髙.pdf"),
    ('Content-Type: application/pdf; name="=?utf-8?q?=E8=A6=8B=E7=A9=8D.pdf?="', "見積.pdf"),
    # filename beats name; the RFC 2231 form beats its plain fallback
    ('Content-Type: application/pdf; name="type.pdf"\n'
     'Content-Disposition: attachment; filename="disposition.pdf"', "disposition.pdf"),
    ("Content-Type: application/pdf\nContent-Disposition: attachment;"
     " filename=\"fallback.pdf\"; filename*=UTF-8''%E8%A6%8B%E7%A9%8D.pdf", "見積.pdf"),
    # an empty filename falls back to name; neither gives ""
    ('Content-Type: application/pdf; name="n.pdf"\nContent-Disposition: attachment; filename=""',
     "n.pdf"),
    ("Content-Type: application/pdf\nContent-Disposition: attachment", ""),
    # unknown charsets and RFC 2231 without a charset still give text
    ("Content-Type: application/pdf\nContent-Disposition: attachment;"
     " filename*=x-unknown''caf%C3%A9.pdf", "café.pdf"),
    ("Content-Type: application/pdf\nContent-Disposition: attachment;"
     " filename*=''%93%FA%96%7B.pdf", "日本.pdf"),
    ("Content-Type: application/pdf; name=unquoted.pdf", "unquoted.pdf"),
])
def test_file_name_forms(headers: str, expected: str) -> None:
    assert single(headers).filename == expected


@pytest.mark.parametrize("name, codec", [
    ("見積書.pdf", "utf-8"),
    ("見積書.pdf", "cp932"),
    ("①㈱髙﨑.xls", "cp932"),
    ("見積書.pdf", "euc-jp"),  # valid CP932 too (as half-width kana): must not win
    ("一覧表", "cp932"),  # 表 = 0x95 0x5C right before the closing quote
    ("ソ\\ソ.txt", "cp932"),  # a trail 0x5C, then a real quoted-pair (an escaped backslash)
])
def test_raw_8bit_names_are_guessed(name: str, codec: str) -> None:
    raw = name.replace("\\", "\\\\").encode(codec)  # a real backslash goes quoted
    found = single("Content-Type: application/octet-stream\nContent-Disposition: attachment;",
                   raw_headers=b' filename="' + raw + b'"')
    assert found.filename == name


def test_raw_jis_name_with_quote_and_semicolon_bytes() -> None:
    # "、" is 0x21 0x22 and "；" is 0x21 0x28 in JIS: a '"' inside the escape run.
    name = "見積、請求；納品.pdf"
    raw = encode_cp50220(name)
    assert b'"' in raw
    found = single("Content-Type: application/pdf\nContent-Disposition: attachment;",
                   raw_headers=b' filename="' + raw + b'"; size=3')
    assert found.filename == name


def test_iso2022jp_rfc2231_name_in_content_type() -> None:
    # The stdlib's policy.default cannot even parse this message (it decodes the name
    # with Python's iso2022_jp, which lacks ①, while building the tree); a compat32
    # tree works, since only raw headers are read here.
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: application/pdf; name*=ISO-2022-JP''%1B%24B-%21-j%1B%28B.pdf\r\n"
           b"\r\n%PDF\r\n--b--\r\n")
    message = BytesParser(policy=policy.compat32, _class=EmailMessage).parsebytes(raw)
    assert summary(find_attachments(message)) == [("①㈱.pdf", "application/pdf", 4, False)]


# --- what is an attachment -----------------------------------------------------------------

def mixed(*parts: str) -> EmailMessage:
    body = "".join(f"--b\r\n{part.replace(chr(10), chr(13) + chr(10))}\r\n" for part in parts)
    return parse(("Content-Type: multipart/mixed; boundary=b\r\n\r\n" + body + "--b--\r\n")
                 .encode("ascii"))


def test_named_body_text_stays_body_and_named_later_text_is_a_file() -> None:
    message = mixed('Content-Type: text/plain; name="body.txt"\n\nhello',
                    'Content-Type: text/plain\n\nsignature text',
                    'Content-Type: text/plain; name="memo.txt"\n'
                    "Content-Disposition: inline\n\nmemo",
                    'Content-Type: text/csv; name="list.csv"\n\na,b')
    assert [a.filename for a in find_attachments(message)] == ["memo.txt", "list.csv"]


def test_attachment_disposition_wins_even_for_the_first_text_part() -> None:
    message = mixed("Content-Type: text/plain\n"
                    'Content-Disposition: attachment; filename="a.txt"\n\nx')
    assert summary(find_attachments(message)) == [("a.txt", "text/plain", 1, False)]


def test_whole_message_as_one_file() -> None:
    message = parse(b'Content-Type: application/pdf; name="scan.pdf"\r\n'
                    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n")
    [found] = find_attachments(message)
    assert (found.filename, found.data, found.part is message) == ("scan.pdf", b"%PDF", True)


def test_unnamed_files_are_found_with_an_empty_name() -> None:
    message = mixed("Content-Type: text/plain\n\nhi",
                    "Content-Type: application/octet-stream\n\nxyz")
    assert summary(find_attachments(message)) == [("", "application/octet-stream", 3, False)]


def test_outlook_related_image_referenced_by_cid_is_body_unreferenced_is_a_file() -> None:
    raw = (
        "Content-Type: multipart/related; boundary=r; type=\"multipart/alternative\"\r\n\r\n"
        "--r\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n"
        "--a\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        "--a\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        "<img src=3D\"cid:image001.png@01DB4F2A.7C3E1B90\">\r\n--a--\r\n"
        "--r\r\nContent-Type: image/png; name=\"image001.png\"\r\n"
        "Content-Disposition: inline; filename=\"image001.png\"\r\n"
        "Content-ID: <IMAGE001.png@01DB4F2A.7C3E1B90>\r\n\r\npng\r\n"
        "--r\r\nContent-Type: image/jpeg; name=\"photo.jpg\"\r\n"
        "Content-ID: <unused@x>\r\n\r\njpg\r\n--r--\r\n").encode("ascii")
    message = parse(raw)
    assert [a.filename for a in find_attachments(message)] == ["photo.jpg"]
    assert [a.filename for a in find_attachments(message, inline_images=True)] == [
        "image001.png", "photo.jpg"]


def test_attached_message_without_subject_or_name() -> None:
    message = mixed("Content-Type: text/plain\n\nfw",
                    "Content-Type: message/rfc822\n\nFrom: a@example.jp\n\nold body",
                    'Content-Type: message/rfc822; name="given.eml"\n\nSubject: s\n\nx')
    assert [(a.filename, a.is_message) for a in find_attachments(message)] == [
        ("message.eml", True), ("given.eml", True)]


def test_base64_encoded_attached_message_is_decoded_and_named() -> None:
    inner = b"Subject: =?UTF-8?B?5pel5aCx?=\r\nFrom: a@example.jp\r\n\r\nhello\r\n"
    message = mixed("Content-Type: text/plain\n\nfw", "Content-Type: message/rfc822\n"
                    "Content-Transfer-Encoding: base64\n\n" + base64.b64encode(inner).decode())
    found = find_attachments(message)
    assert summary(found) == [("日報.eml", "message/rfc822", len(inner), True)]
    assert found[0].data == inner


def test_delivery_status_is_report_structure_not_a_file() -> None:
    raw = (b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nundeliverable\r\n"
           b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
           b"Final-Recipient: rfc822; x@example.jp\r\nStatus: 5.1.1\r\n"
           b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\nSubject: original\r\n--b--\r\n")
    assert find_attachments(parse(raw)) == []


# --- malformed MIME --------------------------------------------------------------------------

PDF_PART = (b"Content-Type: application/pdf; name=\"a.pdf\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n")


@pytest.mark.parametrize("raw, expected", [
    # no closing boundary: the last part runs to the end
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
     b"hi\r\n--b\r\n" + PDF_PART + b"JVBERg==\r\n", [("a.pdf", b"%PDF")]),
    # a multipart without its boundary parameter: one text blob, no files
    (b"Content-Type: multipart/mixed\r\n\r\n--b\r\n" + PDF_PART + b"JVBERg==\r\n--b--\r\n", []),
    # base64 with junk, a line of bad length, padding mid-stream, a dangling character
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + PDF_PART
     + b"JVB!!ERg\xff\xfe==\r\nJVBERg=\r\nQ\r\n--b--\r\n", [("a.pdf", b"%PDF%PDF")]),
    # an unknown charset on the body and in the name
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
     b"Content-Type: text/plain; charset=x-unknown\r\n\r\n\x93\xfa\r\n--b\r\n"
     b"Content-Type: application/octet-stream; name=\"=?x-unknown?B?YS5iaW4=?=\"\r\n\r\nab\r\n"
     b"--b--\r\n", [("a.bin", b"ab")]),
    # codecs that refuse errors="replace", as charsets of names and of the HTML body
    (b"Content-Type: multipart/related; boundary=b\r\n\r\n--b\r\n"
     b"Content-Type: text/html; charset=undefined\r\n\r\n<img src=cid:other>\r\n--b\r\n"
     b"Content-Type: image/gif; name=\"=?undefined?Q?x.gif?=\"\r\nContent-ID: <i>\r\n\r\ngif\r\n"
     b"--b\r\nContent-Type: image/gif\r\nContent-Disposition: attachment; filename*=idna''y.gif"
     b"\r\n\r\ngif\r\n--b--\r\n", [("x.gif", b"gif"), ("y.gif", b"gif")]),
    # parts without Content-Type: text/plain by default, a file only when it says so
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nbody\r\n--b\r\n"
     b"Content-Disposition: attachment; filename=x.txt\r\n\r\nfile\r\n--b--\r\n",
     [("x.txt", b"file")]),
    # a part cut off inside its headers (the stdlib reads the stump as body), a NUL in a name
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
     b"Content-Type: application/pdf; name=\"n\x00ul.pdf\"\r\nContent-Dispo",
     [("n\x00ul.pdf", b"Content-Dispo")]),
    # an 8-bit body declared 7bit, a quoted-printable part with a broken escape
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
     b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
     b"\xff\x00\r\n"
     b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: quoted-printable"
     b"\r\n\r\na=3Db=ZZ\r\n--b--\r\n", [("", b"\xff\x00"), ("", b"a=b=ZZ")]),
])
def test_malformed_mime_gives_what_it_can(raw: bytes, expected: list[tuple[str, bytes]]) -> None:
    assert [(a.filename, a.data) for a in find_attachments(parse(raw))] == expected


FRAGMENTS = st.sampled_from([
    b"--b\r\n", b"--b--\r\n", b"\r\n", b"--inner\r\n",
    b"Content-Type: multipart/mixed; boundary=inner\r\n",
    b"Content-Type: multipart/related; boundary=b; start=\"<x>\"\r\n",
    b"Content-Type: message/rfc822\r\n", b"Content-Type: image/png\r\nContent-ID: <x>\r\n",
    b"Content-Type: text/html\r\n", b"<img src=\"cid:x\">",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''%E2%91; filename*1*=%A0\r\n",
    b"Content-Disposition: inline; filename=\"\x95\\\"\r\n", b"name=\"=?ISO-2022-JP?B?GyRC?=\"",
    b"; charset=undefined", b"; name*=idna''x", b"; name=\"=?undefined?Q?x?=\"",
    b"\x1b$B", b"\x1b(B", b"\"", b";", b"\\", b"=", b"%",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(FRAGMENTS, st.binary(max_size=40)), max_size=40))
def test_random_bytes_after_a_valid_header_never_raise(pieces: list[bytes]) -> None:
    raw = (b"From: a@example.jp\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"".join(pieces))
    message = parse(raw)
    for found in find_attachments(message) + find_attachments(message, inline_images=True):
        assert isinstance(found.filename, str) and found.size == len(found.data)
