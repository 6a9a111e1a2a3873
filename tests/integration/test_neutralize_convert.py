"""The neutralize milter's work on real documents, through its real sandboxed workers,
LibreOffice and pdfium (no sockets: the checker is called the way the milter calls it).

Each output is checked the way a security team would: the PDF objects are read (no
JavaScript, annotations, links, embedded files, fonts or text), page counts compared,
EXIF looked for, and encrypted content refused or dropped as the policy says."""
from __future__ import annotations

import email
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from PIL import Image

from milters.core.edits import ChangeHeader, EomResult, ReplaceBody
from milters.core.message import Envelope, Message, Recipient
from milters.core.policy.document import load_policy_text
from milters.core.verdict import Action
from milters.neutralize.logic import MARK_HEADER, NeutralizeChecker
from mta.cli import EXTENSIONS
from mta.chain.edits_apply import Transit, apply_edits
from tests.harness import documents as docs
from tests.harness.pdf_inspect import image_metadata, inspect_pdf

pytestmark = pytest.mark.integration

STRANGER = "198.51.100.7"
BASE = """\
internal_networks: [127.0.0.0/8]
neutralize:
  encrypted_reply: "550 5.7.1 Password-protected files are refused here; use our upload portal"
  on_failure: drop
{extra}
rules:
  - name: strangers
    when: {{direction: inbound}}
    then: {{neutralize: {action}}}
"""


def policy(extra: str = "", action: str = "neutralize"):  # type: ignore[no-untyped-def]
    return load_policy_text(BASE.format(extra=extra, action=action), EXTENSIONS)


def mail(files: list[tuple[str, bytes, str]], body: str = "See the attached files.\n",
         html: str | None = None) -> bytes:
    message = EmailMessage()
    message["From"] = "Sender <sender@outside.example>"
    message["To"] = "taro@example.jp"
    message["Subject"] = "Documents"
    message["Message-ID"] = "<docs@outside.example>"
    message.set_content(body)
    if html is not None:
        message.add_alternative(html, subtype="html")
    for name, data, ctype in files:
        major, minor = ctype.split("/")
        message.add_attachment(data, maintype=major, subtype=minor, filename=name)
    return bytes(message).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


CHECKER = NeutralizeChecker("mx.example.jp")


def run(raw: bytes, pol=None, client: str = STRANGER) -> tuple[EomResult, bytes]:  # type: ignore[no-untyped-def]
    env = Envelope(client_ip=client, mail_from="sender@outside.example", queue_id="Q1",
                   recipients=[Recipient("taro@example.jp")])
    result = CHECKER.check(Message(raw=raw, envelope=env), pol or policy())
    edits = [ReplaceBody(e.body if isinstance(e.body, bytes) else e.body.read())
             if isinstance(e, ReplaceBody) else e for e in result.edits]
    out = apply_edits(Transit(raw, "sender@outside.example"), edits).raw
    return result, out


def parsed(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    return message


def files_of(raw: bytes) -> dict[str, bytes]:
    return {part.get_filename(): part.get_content() for part in parsed(raw).iter_attachments()
            if part.get_filename() != "mailmoat-note.txt"}


def note_of(raw: bytes) -> str:
    for part in parsed(raw).iter_attachments():
        if part.get_filename() == "mailmoat-note.txt":
            return part.get_content()
    raise AssertionError("no note part")


def pdf_facts(data: bytes, tmp_path: Path, name: str = "out.pdf"):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_bytes(data)
    return inspect_pdf(path)


# -- documents become flat PDFs -----------------------------------------------------------
def test_office_and_odf_documents_become_flat_pdfs_with_their_pages(tmp_path: Path) -> None:
    made = {
        "報告書.docx": docs.docx(tmp_path / "a.docx", ["第一章", "本文"] * 3, pages=3),
        "invoice.docm": docs.docm(tmp_path / "b.docm", ["Enable macros to see the invoice"]),
        "figures.xlsx": docs.xlsx(tmp_path / "c.xlsx", [["item", "price"], ["apple", 120]]),
        "minutes.odt": docs.odt(tmp_path / "d.odt", ["one", "two"], pages=2),
    }
    raw = mail([(name, path.read_bytes(), "application/octet-stream")
                for name, path in made.items()])
    result, out = run(raw)
    assert result.verdict.action is Action.CONTINUE
    got = files_of(out)
    assert sorted(got) == ["figures.pdf", "invoice.pdf", "minutes.pdf", "報告書.pdf"]
    pages = {"報告書.pdf": 3, "invoice.pdf": 1, "figures.pdf": 1, "minutes.pdf": 2}
    for name, data in got.items():
        facts = pdf_facts(data, tmp_path)
        assert facts.is_flat, (name, facts.details)
        assert facts.pages == pages[name], name
    assert "報告書.docx was converted to 報告書.pdf" in note_of(out)
    assert parsed(out)[MARK_HEADER].startswith("links=0; converted=4; dropped=0")


def test_pdf_with_javascript_embedded_file_and_link_is_flattened(tmp_path: Path) -> None:
    source = docs.pdf(tmp_path / "in.pdf", 4, javascript=True, embedded_file=True, link=True)
    before = inspect_pdf(source)
    assert before.has_javascript and before.has_embedded_files and before.has_links
    _, out = run(mail([("contract.pdf", source.read_bytes(), "application/pdf")]))
    facts = pdf_facts(files_of(out)["contract.pdf"], tmp_path)
    assert facts.pages == 4 and facts.is_flat, facts.details
    assert not (facts.has_javascript or facts.has_embedded_files or facts.has_links
                or facts.has_annotations or facts.fonts_or_text)
    import pypdfium2 as pdfium
    rendered = pdfium.PdfDocument(str(tmp_path / "out.pdf"))
    assert len(rendered) == 4  # pdfium opens what we wrote


def test_jpeg_loses_exif_and_gps_and_png_its_text_chunks(tmp_path: Path) -> None:
    photo = docs.jpeg_with_gps(tmp_path / "photo.jpg")
    assert image_metadata(photo).get("gps")
    picture = docs.png(tmp_path / "p.png", text={"Author": "someone", "Comment": "secret"})
    _, out = run(mail([("IMG_0001.JPG", photo.read_bytes(), "image/jpeg"),
                       ("chart.png", picture.read_bytes(), "image/png")]))
    got = files_of(out)
    assert sorted(got) == ["IMG_0001.png", "chart.png"]
    for name, data in got.items():
        (tmp_path / name).write_bytes(data)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and not image.getexif() and not image.text
            assert "icc_profile" not in image.info
        meta = image_metadata(tmp_path / name)
        assert not meta.get("exif") and not meta.get("gps"), meta
    with Image.open(io.BytesIO(got["IMG_0001.png"])) as image:
        assert image.size == (320, 240)


def test_jpeg_output_when_the_policy_asks(tmp_path: Path) -> None:
    photo = docs.jpeg_with_gps(tmp_path / "photo.jpg")
    _, out = run(mail([("photo.jpeg", photo.read_bytes(), "image/jpeg")]),
                 policy("  image_format: jpeg"))
    data = files_of(out)["photo.jpg"]
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and not image.getexif()
        assert "comment" not in image.info


def test_unknown_kinds_are_dropped_and_text_kept_by_the_default_table() -> None:
    raw = mail([("setup.exe", b"MZ\x90\x00" + bytes(200), "application/octet-stream"),
                ("invoice.pdf.exe", b"MZ" + bytes(50), "application/pdf"),
                ("readme.txt", b"plain words\n", "text/plain")])
    _, out = run(raw)
    assert sorted(files_of(out)) == ["readme.txt"]
    note = note_of(out)
    assert "setup.exe was removed" in note and "invoice.pdf.exe was removed" in note


def test_a_renamed_executable_is_judged_by_its_bytes(tmp_path: Path) -> None:
    raw = mail([("scan.pdf", b"MZ\x90\x00" + bytes(300), "application/pdf")])
    _, out = run(raw)
    assert files_of(out) == {}
    assert "scan.pdf was removed: files of this kind (other)" in note_of(out)


def test_hostile_file_names_give_safe_names(tmp_path: Path) -> None:
    photo = docs.png(tmp_path / "p.png")
    raw = mail([("../../etc/cron.d/evil\u202egnp.png", photo.read_bytes(), "image/png")])
    _, out = run(raw)
    (name,) = files_of(out)
    assert "/" not in name and "\u202e" not in name and name.endswith(".png")


# -- encrypted content: the PPAP pattern ------------------------------------------------
SECRET = {"見積書.docx": b"confidential figures" * 50}


def locked_files(tmp_path: Path) -> dict[str, Path]:
    inner = docs.zip_aes_7z(tmp_path / "inner.zip", SECRET, "pw")
    return {
        "zipcrypto-7z.zip": docs.zip_zipcrypto_7z(tmp_path / "z1.zip", SECRET, "pw"),
        "aes-7z.zip": docs.zip_aes_7z(tmp_path / "z2.zip", SECRET, "pw"),
        "zipcrypto-python.zip": docs.zip_zipcrypto_python(tmp_path / "z3.zip", SECRET, "pw"),
        "nested.zip": docs.nested_zip(tmp_path / "z4.zip", inner, 2),
        "locked.7z": docs.sevenz_encrypted(tmp_path / "s.7z", SECRET, "pw", False),
        "hidden-names.7z": docs.sevenz_encrypted(tmp_path / "h.7z", SECRET, "pw", True),
        "protected.docx": docs.encrypted_docx(tmp_path / "e.docx", "pw"),
        "protected.pdf": docs.encrypted_pdf(tmp_path / "e.pdf", "pw"),
    }


def test_every_kind_of_locked_file_is_refused_with_the_teams_reply(tmp_path: Path) -> None:
    for name, path in locked_files(tmp_path).items():
        result, _ = run(mail([(name, path.read_bytes(), "application/octet-stream")]))
        assert result.verdict.action is Action.REJECT, name
        assert str(result.verdict.reply) == ("550 5.7.1 Password-protected files are refused "
                                             "here; use our upload portal"), name


def test_locked_files_are_dropped_with_a_note_when_a_rule_says_so(tmp_path: Path) -> None:
    files = locked_files(tmp_path)
    raw = mail([(name, path.read_bytes(), "application/octet-stream")
                for name, path in files.items()])
    result, out = run(raw, policy(action="{encrypted: drop}"))
    assert result.verdict.action is Action.CONTINUE
    assert files_of(out) == {}
    note = note_of(out)
    for name in files:
        assert f"{name} was removed" in note
    assert "locked files cannot be checked" in note


def test_plain_archives_and_owner_only_pdfs_are_not_locked(tmp_path: Path) -> None:
    plain = docs.zip_plain(tmp_path / "plain.zip", {"a.txt": b"hello"})
    seven = docs.sevenz_plain(tmp_path / "plain.7z", {"a.txt": b"hello"})
    owner = docs.owner_only_pdf(tmp_path / "owner.pdf")
    raw = mail([("plain.zip", plain.read_bytes(), "application/zip"),
                ("plain.7z", seven.read_bytes(), "application/x-7z-compressed"),
                ("owner.pdf", owner.read_bytes(), "application/pdf")])
    result, out = run(raw, policy("  convert:\n    - {match: [archive], action: keep}\n"
                                  "    - {match: [pdf], action: flatten}"))
    assert result.verdict.action is Action.CONTINUE
    got = files_of(out)
    assert got["plain.zip"] == plain.read_bytes() and got["plain.7z"] == seven.read_bytes()
    assert pdf_facts(got["owner.pdf"], tmp_path).is_flat


# -- bombs and limits: bounded time, defined verdict --------------------------------------
def test_zip_bomb_and_nested_bombs_get_a_defined_verdict_quickly(tmp_path: Path) -> None:
    """A bomb is never inflated: only central directories and nested archives (within the
    byte budget and depth) are read."""
    bomb = docs.zip_bomb(tmp_path / "bomb.zip")
    nested = docs.nested_zip_bomb(tmp_path / "nested.zip", count=3)
    deep = docs.nested_zip(tmp_path / "deep.zip", docs.zip_plain(tmp_path / "x.zip",
                                                                 {"a.txt": b"a"}), 5)
    keep = "  convert:\n    - {match: [archive], action: keep}\n"
    started = time.monotonic()
    result, out = run(mail([("bomb.zip", bomb.read_bytes(), "application/zip"),
                            ("nested.zip", nested.read_bytes(), "application/zip"),
                            ("deep.zip", deep.read_bytes(), "application/zip")]),
                      policy(keep))
    assert time.monotonic() - started < 60
    assert result.verdict.action is Action.CONTINUE
    assert sorted(files_of(out)) == ["bomb.zip", "nested.zip"]
    assert "deep.zip was removed: it could not be made safe (archives nested deeper than 3)" \
        in note_of(out)
    _, out = run(mail([("nested.zip", nested.read_bytes(), "application/zip")]),
                 policy(keep + "  limits: {archive_bytes: 1000000}"))
    assert "nested.zip was removed: it could not be made safe (nested archives larger " \
           "than the decompression limit)" in note_of(out)


def test_ten_thousand_pages_is_over_the_page_limit(tmp_path: Path) -> None:
    many = docs.pdf_many_pages(tmp_path / "many.pdf", 10_000)
    started = time.monotonic()
    result, out = run(mail([("many.pdf", many.read_bytes(), "application/pdf")]))
    assert time.monotonic() - started < 60
    assert files_of(out) == {}
    assert "10000 pages; the limit is 50" in note_of(out)


def test_a_pixel_bomb_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    huge = docs.huge_image_header(tmp_path / "huge.png")
    started = time.monotonic()
    _, out = run(mail([("huge.png", huge.read_bytes(), "image/png")]))
    assert time.monotonic() - started < 30
    assert "a picture of 50000 x 50000 pixels" in note_of(out)


def test_tempfail_is_the_default_for_a_failed_conversion(tmp_path: Path) -> None:
    huge = docs.huge_image_header(tmp_path / "huge.png")
    pol = load_policy_text("internal_networks: [127.0.0.0/8]\nrules:\n  - name: all\n"
                           "    when: {direction: inbound}\n    then: {neutralize: neutralize}\n",
                           EXTENSIONS)
    result, _ = run(mail([("huge.png", huge.read_bytes(), "image/png")]), pol)
    assert result.verdict.action is Action.TEMPFAIL
    assert str(result.verdict.reply).startswith("451 4.7.0")


# -- the sandbox: crashes, hangs, limits, no network --------------------------------------
def fake_office(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-soffice"
    script.write_text(f"#!{sys.executable}\n{body}\n")
    script.chmod(0o755)
    return script


def office_policy(soffice: Path, wall: str = "60s") -> object:
    return policy(f"  soffice: {soffice}\n  limits: {{wall: {wall}}}")


def host_processes(marker: str) -> list[int]:
    """Live host pids whose command line holds `marker`. A converter cannot tell us its
    pids: it runs in a pid namespace of its own and cannot write outside its directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in command and state != "Z":
            found.append(int(entry.name))
    return found


def wait_for_processes(markers: list[str], running: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not all(host_processes(m) for m in markers):
        assert running() and time.monotonic() < deadline, f"never saw {markers}"
        time.sleep(0.05)


def test_a_hanging_converter_is_killed_with_everything_it_started(tmp_path: Path) -> None:
    sleeper = f"299.{os.getpid()}"  # `sleep` with an argument no other process has
    script = fake_office(tmp_path, "import subprocess, time\n"
                         f"child = subprocess.Popen(['sleep', {sleeper!r}])\n"
                         "time.sleep(300)")
    document = docs.docx(tmp_path / "a.docx", ["x"])
    started = time.monotonic()
    done: list[bytes] = []
    worker = threading.Thread(target=lambda: done.append(run(
        mail([("a.docx", document.read_bytes(), "application/octet-stream")]),
        office_policy(script, "3s"))[1]))
    worker.start()
    wait_for_processes([str(script), sleeper], worker.is_alive)
    worker.join(max(0.0, started + 20 - time.monotonic()))  # the bound: 3 s limit, 20 s wait
    assert done, "the hanging converter was not stopped within 20 s"
    assert "took longer than 3 s" in note_of(done[0])
    assert host_processes(str(script)) == [] and host_processes(sleeper) == []


def test_a_crashing_converter_gives_the_failure_action(tmp_path: Path) -> None:
    script = fake_office(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    document = docs.docx(tmp_path / "a.docx", ["x"])
    _, out = run(mail([("a.docx", document.read_bytes(), "application/octet-stream")]),
                 office_policy(script))
    assert "LibreOffice could not convert it (exit -11" in note_of(out)


def test_the_converter_has_no_network(tmp_path: Path) -> None:
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    # What it saw comes back in its complaint (stderr), quoted in the note.
    script = fake_office(tmp_path, "import socket, sys\ntry:\n"
                         f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                         "    said = 'connected'\nexcept OSError as exc:\n    said = str(exc)\n"
                         "print('SAW:', said, file=sys.stderr)\nraise SystemExit(1)")
    document = docs.docx(tmp_path / "a.docx", ["x"])
    listener.setblocking(False)
    try:
        _, out = run(mail([("a.docx", document.read_bytes(), "application/octet-stream")]),
                     office_policy(script))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the host's port
    finally:
        listener.close()
    seen = note_of(out).split("SAW:", 1)[1]
    assert "connected" not in seen
    # Its own namespace: bwrap's loopback, on which nothing listens.
    assert "connection refused" in seen.lower()


def test_the_memory_limit_stops_a_converter(tmp_path: Path) -> None:
    photo = docs.png(tmp_path / "big.png", 6000, 6000)
    _, out = run(mail([("big.png", photo.read_bytes(), "image/png")]),
                 policy("  limits: {memory: 67108864}"))
    assert files_of(out) == {}
    assert "big.png was removed: it could not be made safe" in note_of(out)


def test_no_private_directory_is_left_behind(tmp_path: Path) -> None:
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    photo = docs.png(tmp_path / "p.png")
    run(mail([("p.png", photo.read_bytes(), "image/png")]))
    after = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    assert not [d for d in after - before if d.startswith("mailmoat-neutralize-")]


# -- who is neutralized -------------------------------------------------------------------
def test_internal_clients_pass_untouched_and_forged_markers_are_removed() -> None:
    raw = mail([]).replace(b"Subject:", f"{MARK_HEADER}: links=0; rule=trusted\r\nSubject:"
                           .encode())
    result, out = run(raw, client="127.0.0.1")
    assert [e for e in result.edits if isinstance(e, ChangeHeader)] == \
        [ChangeHeader(MARK_HEADER, 1, "")]
    assert MARK_HEADER not in parsed(out)


def test_a_pass_rule_leaves_the_message_alone() -> None:
    raw = mail([], body="visit https://example.com/\n")
    result, out = run(raw, policy(action="pass"))
    assert out == raw and result.edits == []


def test_the_scan_command_shows_the_same_result(tmp_path: Path) -> None:
    photo = docs.jpeg_with_gps(tmp_path / "photo.jpg")
    raw = mail([("photo.jpg", photo.read_bytes(), "image/jpeg")],
               body="login: https://evil.example/x\n")
    (tmp_path / "m.eml").write_bytes(raw)
    (tmp_path / "policy.yaml").write_text(BASE.format(extra="", action="neutralize"))
    (tmp_path / "config.yaml").write_text("gateway: {hostname: mx.example.jp}\n"
                                          "milters: [{name: neutralize}]\npolicy: policy.yaml\n"
                                          "store: memory://\n")
    done = subprocess.run([sys.executable, "-m", "mta.cli", "scan", str(tmp_path / "m.eml"),
                           "--config", str(tmp_path / "config.yaml"), "--client-ip", STRANGER,
                           "--mail-from", "sender@outside.example", "--rcpt", "taro@example.jp",
                           "--out", str(tmp_path / "out.eml"), "--user", "root"],
                          capture_output=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    scanned = parsed((tmp_path / "out.eml").read_bytes())
    assert scanned[MARK_HEADER].startswith("links=1; converted=1; dropped=0")
    assert "hxxps://evil[.]example/x" in scanned.get_body(("plain",)).get_content()


# -- HTML modes ---------------------------------------------------------------------------
LURE = '<p>Pay <a href="https://evil.example/pay">here</a><script>x()</script></p>'


def test_prefer_text_drops_html_that_has_a_text_version() -> None:
    raw = mail([], body="Pay at https://evil.example/pay\n", html=LURE)
    _, out = run(raw, policy(action="{html: prefer_text}"))
    message = parsed(out)
    assert message.get_body(("html",)) is None
    assert "hxxps://evil[.]example/pay" in message.get_body(("plain",)).get_content()
    assert "html=text_kept" in message[MARK_HEADER]


def test_html_without_a_text_version_is_turned_into_text() -> None:
    raw = (b"From: a@outside.example\r\nTo: taro@example.jp\r\nSubject: pay\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           + LURE.encode() + b"\r\n")
    _, out = run(raw, policy(action="{html: prefer_text}"))
    message = parsed(out)
    assert message.get_content_type() == "multipart/mixed"  # the text, then the note
    (text,) = [p.get_content() for p in message.walk()
               if p.get_content_type() == "text/plain" and not p.get_filename()]
    assert text.strip() == "Pay here [hxxps://evil[.]example/pay]"
    assert not [p for p in message.walk() if p.get_content_type() == "text/html"]


def test_japanese_text_keeps_its_words_when_its_links_are_defanged() -> None:
    body = "ご確認ください: https://例え.jp/確認 ①㈱髙\n"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@x.example", "t@example.jp", "確認"
    message.set_content(body.encode("cp932").decode("cp932"))
    raw = bytes(message).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    _, out = run(raw)
    texts = [p.get_content().replace("\r\n", "\n") for p in parsed(out).walk()
             if p.get_content_type() == "text/plain" and not p.get_filename()]
    assert texts == ["ご確認ください: hxxps://例え[.]jp/確認 ①㈱髙\n"]


def test_iso_2022_jp_text_with_windows_characters_is_read_right() -> None:
    from milters.core.jis import encode_cp50220
    raw = (b"From: a@x.example\r\nTo: t@example.jp\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=ISO-2022-JP\r\n"
           b"Content-Transfer-Encoding: 7bit\r\n\r\n"
           + encode_cp50220("㈱髙山: https://evil.example/x\r\n"))
    _, out = run(raw)
    texts = [p.get_content().replace("\r\n", "\n") for p in parsed(out).walk()
             if p.get_content_type() == "text/plain" and not p.get_filename()]
    assert texts == ["㈱髙山: hxxps://evil[.]example/x\n"]


def test_a_dead_milters_directories_are_removed_by_the_next_one(tmp_path: Path) -> None:
    from milters.neutralize.sandbox import PREFIX, remove_stale
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{PREFIX}{dead.pid}-abc"
    stale.mkdir()
    (stale / "input.docx").write_bytes(b"x")
    alive = tmp_path / f"{PREFIX}{os.getpid()}-def"
    alive.mkdir()
    assert remove_stale(tmp_path) == [stale]
    assert not stale.exists() and alive.exists()


STOPPED_MID_CONVERSION = """
import sys, threading, time
from pathlib import Path
from milters.neutralize.sandbox import Sandbox
from milters.neutralize.worker import Job
from milters.neutralize.convert import Options
options = Options(soffice=sys.argv[2])
sandbox = Sandbox(1, wall=300)
threading.Thread(target=sandbox.convert, daemon=True, args=(
    lambda s, t: Job("flatten-office", s, t, options), open(sys.argv[1], "rb"), ".docx")).start()
time.sleep(3)
sys.exit(0)  # the milter stopping (SIGTERM ends run_milter, then the interpreter exits)
"""


def test_conversions_do_not_outlive_the_milter(tmp_path: Path) -> None:
    script = fake_office(tmp_path, "import time\ntime.sleep(300)")
    document = docs.docx(tmp_path / "a.docx", ["x"])
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    milter = subprocess.Popen([sys.executable, "-c", STOPPED_MID_CONVERSION, str(document),
                               str(script)], env=env, stderr=subprocess.PIPE)
    wait_for_processes([str(script)], lambda: milter.poll() is None)
    _, errors = milter.communicate(timeout=60)
    assert milter.returncode == 0, errors.decode()
    deadline = time.monotonic() + 10
    while host_processes(str(script)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_processes(str(script)) == []
    assert not list(tmp_path.glob("mailmoat-neutralize-*"))


RARS = Path(__file__).resolve().parents[2] / ".venv" / "share" / "mailmoat-testdata" / "rar"


@pytest.mark.parametrize("name, locked", [
    ("rar3-comment-psw.rar", True), ("rar3-comment-hpsw.rar", True),
    ("rar5-psw.rar", True), ("rar5-hpsw.rar", True),
    ("rar5-blake.rar", False), ("rar3-old.rar", False),
])
def test_rar_archives_made_by_rar_itself(name: str, locked: bool) -> None:
    """RAR 3 and RAR 5 archives with passwords on the files or on the whole archive (names
    hidden), fetched by scripts/fetch-test-data from rarfile's test files."""
    data = (RARS / name).read_bytes()
    keep = "  convert:\n    - {match: [archive], action: keep}"
    result, out = run(mail([(name, data, "application/vnd.rar")]), policy(keep))
    if locked:
        assert result.verdict.action is Action.REJECT
    else:
        assert result.verdict.action is Action.CONTINUE
        assert files_of(out) == {name: data}


# -- files no converter can read: permanent, never a tempfail ------------------------------
DEFAULTS = ("internal_networks: [127.0.0.0/8]\nneutralize:\n{extra}\nrules:\n  - name: all\n"
            "    when: {{direction: inbound}}\n    then: {{neutralize: neutralize}}\n")


def default_policy(extra: str = ""):  # type: ignore[no-untyped-def]
    """The defaults of every neutralize key (on_failure: tempfail) but `extra`."""
    return load_policy_text(DEFAULTS.format(extra=extra or "  language: en"), EXTENSIONS)


def broken_files(tmp_path: Path) -> list[tuple[str, bytes, str]]:
    from tests.harness import broken_files as broken
    return [("cut.png", broken.truncated_png(tmp_path / "cut.png").read_bytes(), "image/png"),
            ("garbage.pdf", broken.garbage_pdf(tmp_path / "g.pdf").read_bytes(),
             "application/pdf"),
            ("broken.docx", broken.corrupt_docx(tmp_path / "b.docx").read_bytes(),
             "application/vnd.openxmlformats-officedocument.wordprocessingml.document")]


def test_files_no_converter_can_read_are_dropped_with_the_reason_not_tempfailed(
        tmp_path: Path) -> None:
    good = docs.png(tmp_path / "good.png")
    raw = mail(broken_files(tmp_path) + [("good.png", good.read_bytes(), "image/png")])
    result, out = run(raw, default_policy())
    assert result.verdict.action is Action.CONTINUE, result.verdict
    assert sorted(files_of(out)) == ["good.png"]  # the readable one converted, still there
    said = note_of(out)
    assert "cut.png was removed: it cannot be read (not a picture Pillow can read" in said
    assert "garbage.pdf was removed: it cannot be read (not a PDF pdfium can open" in said
    assert ("broken.docx was removed: it cannot be read (LibreOffice cannot load it: source "
            "file could not be loaded)") in said
    assert "dropped=3" in parsed(out)[MARK_HEADER]


def test_an_unreadable_file_rejects_the_message_when_the_policy_says_so(
        tmp_path: Path) -> None:
    files = broken_files(tmp_path)[1:2]
    result, _ = run(mail(files), default_policy(
        "  on_unreadable: reject\n  unreadable_reply: '554 5.6.0 Broken file; send a new one'"))
    assert result.verdict.action is Action.REJECT
    assert str(result.verdict.reply) == "554 5.6.0 Broken file; send a new one"


def test_a_converter_killed_by_a_signal_on_a_readable_file_still_tempfails(
        tmp_path: Path) -> None:
    script = fake_office(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    document = docs.docx(tmp_path / "a.docx", ["x"])
    result, _ = run(mail([("a.docx", document.read_bytes(), "application/octet-stream")]),
                    default_policy(f"  soffice: {script}"))
    assert result.verdict.action is Action.TEMPFAIL, result.verdict
    assert str(result.verdict.reply).startswith("451 4.7.0")


def test_a_converter_that_hangs_on_a_readable_file_still_tempfails(tmp_path: Path) -> None:
    script = fake_office(tmp_path, "import time\ntime.sleep(300)")
    document = docs.docx(tmp_path / "a.docx", ["x"])
    result, _ = run(mail([("a.docx", document.read_bytes(), "application/octet-stream")]),
                    default_policy(f"  soffice: {script}\n  limits: {{wall: 3s}}"))
    assert result.verdict.action is Action.TEMPFAIL, result.verdict
    assert "took longer than 3 s" in result.verdict.reason


def test_a_converter_that_ends_well_without_output_or_reason_still_tempfails(
        tmp_path: Path) -> None:
    """Only LibreOffice's own "could not be loaded" makes a document unreadable: a program
    that exits 0 and writes nothing (a broken install, a profile it could not make) is a
    failure another try may cure."""
    script = fake_office(tmp_path, "import sys\nprint('Warning: no profile', file=sys.stderr)")
    document = docs.docx(tmp_path / "a.docx", ["x"])
    result, _ = run(mail([("a.docx", document.read_bytes(), "application/octet-stream")]),
                    default_policy(f"  soffice: {script}"))
    assert result.verdict.action is Action.TEMPFAIL, result.verdict
