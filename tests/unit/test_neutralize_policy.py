"""Who is neutralized, as a policy editor sees it: auth and subject conditions, trusted
domains, per-rule switches, `policy explain --auth` and `tests:` with auth results; and the
small pieces the milter rests on (file kinds, the conversion table, the page-image PDF
writer, replacing parts of a message by byte ranges)."""
from __future__ import annotations

import email
import io
import subprocess
import sys
import zlib
from email import policy as email_policy
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from PIL import Image

from milters.core.message import Envelope, Message
from milters.core.mime.scan import scan
from milters.core.mime.stream import NewPart, rebuild
from milters.core.policy.document import load_policy_text
from milters.neutralize.classify import conversion_for, kind_of
from milters.neutralize.decide import decide, decide_envelope
from milters.neutralize.pdfwriter import ImagePdfWriter
from milters.neutralize.settings import DEFAULT_CONVERT, Treatment
from mta.cli import EXTENSIONS
from tests.conftest import ROOT

POLICY = """\
internal_networks: [127.0.0.0/8, 10.0.0.0/8]
neutralize:
  trusted_domains: [partner.example]
  html: prefer_text
rules:
  - name: dmarc-fail
    when: {auth: {dmarc: [fail, none]}}
    then: {neutralize: neutralize}
  - name: spf-fail-links-only
    when: {auth: {spf: [fail, softfail]}}
    then: {neutralize: {attachments: keep, html: keep}}
  - name: invoice-lure
    when: {subject: ["請求書", "(?:invoice|payment) (?:due|overdue)"]}
    then: {neutralize: neutralize}
defaults:
  neutralize: pass
tests:
  - name: a spoofed bank is neutralized
    message: {client_ip: 198.51.100.1, mail_from: a@bank.example, rcpt: [u@example.jp],
              auth: {dmarc: fail, spf: fail}}
    expect: {neutralize: {action: neutralize, rule: dmarc-fail}}
  - name: a trusted partner passes
    message: {client_ip: 198.51.100.1, mail_from: a@partner.example, rcpt: [u@example.jp],
              auth: {dmarc: pass}}
    expect: {neutralize: {action: pass, rule: (trusted domain)}}
"""


def env(client: str = "198.51.100.1", sender: str = "a@stranger.example") -> Envelope:
    return Envelope(client_ip=client, mail_from=sender)


def test_auth_and_subject_conditions_and_per_rule_switches() -> None:
    policy = load_policy_text(POLICY, EXTENSIONS)
    section = policy.sections["neutralize"]
    d = decide_envelope(policy, env(), "hello", {"dmarc": "fail", "spf": "pass"})
    assert (d.action, d.why) == ("neutralize", "dmarc-fail")
    assert d.treatment == Treatment(html="prefer_text")
    d = decide_envelope(policy, env(), "hello", {"dmarc": "pass", "spf": "softfail"})
    assert d.why == "spf-fail-links-only"
    assert d.treatment == Treatment(links="defang", html="keep", attachments="keep",
                                    encrypted="reject")
    assert section.treatment.attachments == "convert"  # the rule changed only its own copy
    d = decide_envelope(policy, env(), "【至急】請求書のご確認", {"dmarc": "pass"})
    assert d.why == "invoice-lure"
    d = decide_envelope(policy, env(), "Payment OVERDUE notice", {"dmarc": "pass"})
    assert d.why == "invoice-lure"
    d = decide_envelope(policy, env(), "lunch?", {"dmarc": "pass", "spf": "pass"})
    assert (d.action, d.why) == ("pass", "(defaults)")


def test_a_method_missing_from_the_results_counts_as_none() -> None:
    policy = load_policy_text(POLICY, EXTENSIONS)
    assert decide_envelope(policy, env(), "", {"spf": "pass"}).why == "dmarc-fail"


def test_without_auth_results_auth_rules_do_not_match() -> None:
    policy = load_policy_text(POLICY, EXTENSIONS)
    assert decide_envelope(policy, env(), "", None).why == "(defaults)"


def test_trusted_domains_need_a_dmarc_pass_for_that_domain() -> None:
    policy = load_policy_text(POLICY, EXTENSIONS)
    assert decide_envelope(policy, env(), "", {"dmarc": "pass"},
                           "mail.partner.example").why == "(trusted domain)"
    assert decide_envelope(policy, env(), "", {"dmarc": "fail"},
                           "partner.example").why == "dmarc-fail"
    assert decide_envelope(policy, env(), "", {"dmarc": "pass"},
                           "notpartner.example").why == "(defaults)"


def test_internal_and_authenticated_senders_are_skipped() -> None:
    policy = load_policy_text(POLICY, EXTENSIONS)
    assert decide_envelope(policy, env("10.1.2.3"), "", {"dmarc": "fail"}).why == "(internal)"
    authed = Envelope(client_ip="198.51.100.1", mail_from="a@x.example", auth_user="taro")
    assert decide_envelope(policy, authed, "", {"dmarc": "fail"}).why == "(authenticated)"


def test_results_are_read_only_from_our_own_header() -> None:
    policy = load_policy_text(POLICY, EXTENSIONS)
    raw = (b"Authentication-Results: mx.example.jp; dmarc=pass header.from=partner.example\r\n"
           b"Authentication-Results: mx.example.jp; spf=pass smtp.mailfrom=x\r\n"
           b"Subject: hi\r\n\r\nbody\r\n")
    message = Message(raw=raw, envelope=env())
    assert decide(policy, message, "mx.example.jp").why == "(trusted domain)"
    # The same header from someone else's server proves nothing.
    assert decide(policy, message, "mx.other.example").why == "(defaults)"
    forged = raw.replace(b"dmarc=pass", b"dmarc=fail")
    assert decide(policy, Message(raw=forged, envelope=env()), "mx.example.jp").why \
        == "dmarc-fail"


def mailmoat(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_policy_test_and_explain_with_auth_results(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    result = mailmoat("policy", "test", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 0 failed" in result.stdout
    result = mailmoat("policy", "explain", "--policy", str(path), "--client-ip",
                      "198.51.100.9", "--mail-from", "x@bank.example", "--rcpt",
                      "u@example.jp", "--auth", "dmarc=fail,spf=pass")
    assert result.returncode == 0, result.stderr
    assert "auth dmarc=fail, spf=pass" in result.stdout
    assert "neutralize: neutralize  (decided by rule 'dmarc-fail')" in result.stdout
    assert "  - links: defang; HTML: prefer_text" in result.stdout
    assert ("a failed conversion: tempfail; a file no converter can read: drop"
            in result.stdout)
    bad = mailmoat("policy", "explain", "--policy", str(path), "--mail-from", "x@y.example",
                   "--rcpt", "u@example.jp", "--auth", "dmarc=maybe")
    assert bad.returncode == 2 and "'dmarc=maybe' is not METHOD=RESULT" in bad.stderr


def test_policy_explain_and_test_keep_spf_and_spf_helo_apart(tmp_path: Path) -> None:
    """Issue 13: `spf` is the MAIL FROM result (RFC 7489), `spf_helo` the HELO check; a
    passing HELO given beside a failing MAIL FROM still matches a rule on spf: [fail]."""
    path = tmp_path / "p.yaml"
    path.write_text(POLICY + """  - name: helo passing does not hide a failing MAIL FROM
    message: {client_ip: 198.51.100.1, mail_from: a@bank.example, rcpt: [u@example.jp],
              auth: {dmarc: pass, spf: fail, spf_helo: pass}}
    expect: {neutralize: {action: neutralize, rule: spf-fail-links-only}}
""")
    result = mailmoat("policy", "test", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed" in result.stdout
    result = mailmoat("policy", "explain", "--policy", str(path), "--client-ip",
                      "198.51.100.9", "--mail-from", "x@bank.example", "--rcpt",
                      "u@example.jp", "--auth", "dmarc=pass,spf=fail,spf_helo=pass")
    assert result.returncode == 0, result.stderr
    assert "neutralize: neutralize  (decided by rule 'spf-fail-links-only')" in result.stdout
    result = mailmoat("policy", "explain", "--policy", str(path), "--client-ip",
                      "198.51.100.9", "--mail-from", "x@bank.example", "--rcpt",
                      "u@example.jp", "--auth", "dmarc=pass,spf=pass,spf_helo=fail")
    assert "neutralize: pass  (decided by (defaults))" in result.stdout, result.stdout


@pytest.mark.parametrize("head, name, ctype, expected", [
    (b"%PDF-1.7\n", "x.bin", "application/octet-stream", "pdf"),
    (b"\xff\xd8\xff\xe0", "photo.pdf", "application/pdf", "image"),
    (b"MZ\x90\x00", "invoice.pdf", "application/pdf", "other"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "old.doc", "application/msword", "office"),
    (b"7z\xbc\xaf\x27\x1c", "a.7z", "application/octet-stream", "archive"),
    (b"Rar!\x1a\x07\x01\x00", "a.rar", "application/octet-stream", "archive"),
    (b"plain words", "notes.txt", "text/plain", "text"),
    (b"<svg onload=x()>", "logo.svg", "image/svg+xml", "other"),
    (b"{\\rtf1", "a.rtf", "application/rtf", "office"),
])
def test_kinds_come_from_the_bytes_first(head: bytes, name: str, ctype: str,
                                         expected: str) -> None:
    assert kind_of(head, name, ctype) == expected


def test_a_zip_is_a_document_only_when_its_directory_says_so() -> None:
    import zipfile
    for names, expected in ((["[Content_Types].xml", "word/document.xml"], "office"),
                            (["mimetype", "content.xml"], "office"),
                            (["a.exe"], "archive")):
        data = io.BytesIO()
        with zipfile.ZipFile(data, "w") as archive:
            for name in names:
                archive.writestr(name, "x")
        data.seek(0)
        assert kind_of(data.getvalue()[:1024], "x.zip", "application/zip", data) == expected


def test_the_first_matching_row_of_the_table_decides() -> None:
    from milters.neutralize.settings import Conversion
    table = (Conversion((".csv", "text/*"), "keep"), Conversion(("image",), "image"),
             Conversion(("application/pdf",), "drop")) + DEFAULT_CONVERT
    assert conversion_for("office", "a.csv", "text/csv", table) == "keep"
    assert conversion_for("text", "a.txt", "text/plain", table) == "keep"
    assert conversion_for("pdf", "a.pdf", "application/pdf", table) == "drop"
    assert conversion_for("other", "a.bin", "application/x-what", ()) == "drop"


def test_the_page_image_pdf_opens_with_the_right_pages_and_sizes() -> None:
    out = io.BytesIO()
    writer = ImagePdfWriter(out)
    page = Image.new("RGB", (85, 110), "white")
    jpeg = io.BytesIO()
    page.save(jpeg, "JPEG")
    writer.add_jpeg(jpeg.getvalue(), 85, 110, (612.0, 792.0))
    writer.add_deflated(zlib.compress(Image.new("RGB", (110, 85), "red").tobytes()), 110, 85,
                        (792.0, 612.0))
    writer.close()
    document = pdfium.PdfDocument(out.getvalue())
    assert len(document) == 2
    assert document[0].get_size() == pytest.approx((612, 792))
    assert document[1].get_size() == pytest.approx((792, 612))
    pixel = document[1].render(scale=0.2).to_pil().convert("RGB").getpixel((10, 10))
    assert pixel[0] > 200 and pixel[1] < 60  # the red page came back red


def test_rebuild_replaces_parts_in_place_and_a_replaced_root_brings_its_headers() -> None:
    raw = (b"From: a@x\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: text/plain\r\n\r\nfirst\r\n--B\r\nContent-Type: text/html\r\n\r\n"
           b"<b>second</b>\r\n--B--\r\n")
    root = scan(raw)
    new = NewPart(b"Content-Type: text/plain; charset=us-ascii\r\n\r\n", b"replaced")
    rebuilt = rebuild(raw, root, [], [], [(root.children[1], new)])
    body = rebuilt.body.read()
    message = email.message_from_bytes(raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body,
                                       policy=email_policy.default)
    texts = [p.get_content().strip() for p in message.walk() if not p.is_multipart()]
    assert texts == ["first", "replaced"]
    single = b"From: a@x\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n"
    root = scan(single)
    rebuilt = rebuild(single, root, [], [], [(root, new)])
    assert rebuilt.body.read() == b"replaced"
    assert rebuilt.mime_headers["Content-Type"] == "text/plain; charset=us-ascii"
    assert rebuilt.mime_headers["Content-Transfer-Encoding"] is None


def test_on_unreadable_takes_drop_or_reject_and_never_tempfail() -> None:
    from milters.core.errors import ConfigError
    def with_value(value: str) -> str:
        return POLICY.replace("neutralize:\n", f"neutralize:\n  on_unreadable: {value}\n", 1)
    policy = load_policy_text(with_value("reject"), EXTENSIONS)
    assert policy.sections["neutralize"].on_unreadable == "reject"
    with pytest.raises(ConfigError) as refused:
        load_policy_text(with_value("tempfail"), EXTENSIONS)
    assert "neutralize.on_unreadable" in str(refused.value)
