"""The attachments milter (PPAP countermeasure) behind our own MTA and behind a private
Postfix: a message to one external and one internal recipient is split; the external one
gets the attachments in a ZIP that 7z and unzip open with the password from the notice,
the internal one gets the original, the sender gets exactly one notice, nobody two copies."""
from __future__ import annotations

import contextlib
import email
import os
import re
import subprocess
import time
import tempfile
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.mime.parts import find_attachments
from milters.core.jis import decode_cp50220
from tests.harness.milter_proc import ROOT, MilterProcess, reinjecting_config
from tests.harness.postfix import PostfixInstance, postfix_instance
from tests.harness.sink import SinkMessage, SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

SAMPLE = ROOT / "samples" / "ppap-attachment-ja.eml"
SENDER, EXTERNAL, INTERNAL = "hanako@example.jp", "buyer@customer.example", "taro@example.jp"
POLICY = """\
internal_networks: [127.0.0.0/8]
attachments:
  notice: {to: sender, language: ja}
rules:
  - name: external-recipients-get-a-zip
    when: {direction: outbound, recipient: ["*", "!@example.jp"]}
    then: {attachments: encrypt}
"""


def parsed(item: SinkMessage) -> EmailMessage:
    message = email.message_from_bytes(item.data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def notice_text(message: EmailMessage) -> str:
    raw = message.get_payload(decode=True)
    assert isinstance(raw, bytes)
    charset = (message.get_content_charset() or "").lower()
    return decode_cp50220(raw) if charset == "iso-2022-jp" else raw.decode(charset or "utf-8")


def password_from(text: str) -> str:
    """The line after the ■パスワード heading of the ja notice."""
    found = re.search(r"■パスワード\s*\n\s*(\S+)", text)
    assert found, text
    return found.group(1)


@dataclass
class Delivered:
    zipped: EmailMessage  # the external recipient's copy
    original: EmailMessage  # the internal recipient's copy
    notice: EmailMessage


def sort_out(sink: SmtpSink, count: int = 3) -> Delivered:
    items = sink.wait_for(count, timeout=20)
    by_rcpt: dict[str, list[SinkMessage]] = {}
    for item in items:
        for rcpt in item.rcpt_tos:
            by_rcpt.setdefault(rcpt, []).append(item)
    # Exactly one delivery per recipient: nobody gets two copies.
    assert {r: len(v) for r, v in by_rcpt.items()} == {EXTERNAL: 1, INTERNAL: 1, SENDER: 1}, \
        [(i.mail_from, i.rcpt_tos) for i in items]
    notice = by_rcpt[SENDER][0]
    assert notice.mail_from == "<>"  # RFC 3834: auto-generated, null return path
    return Delivered(parsed(by_rcpt[EXTERNAL][0]), parsed(by_rcpt[INTERNAL][0]), parsed(notice))


def check_split_delivery(delivered: Delivered) -> None:
    original = email.message_from_bytes(SAMPLE.read_bytes(), policy=email.policy.default)
    originals = {a.filename: a.data for a in find_attachments(original)}
    # The internal recipient: the attachment as sent.
    assert {a.filename: a.data for a in find_attachments(delivered.original)} == originals
    # The external one: no attachment but the ZIP; the body text kept.
    found = find_attachments(delivered.zipped)
    assert [a.content_type for a in found] == ["application/zip"], [a.filename for a in found]
    assert re.fullmatch(r"AttachFile\.\d{8}\.zip", found[0].filename)
    body = delivered.zipped.get_body(preferencelist=("plain",))
    assert body is not None and "見積書" in body.get_content()
    # The notice: threaded to the original, in ISO-2022-JP, with the password.
    notice = delivered.notice
    assert notice["In-Reply-To"] == "<20261128101500.3@example.jp>"
    assert notice["Auto-Submitted"] == "auto-generated"
    assert notice.get_content_charset() == "iso-2022-jp"
    password = password_from(notice_text(notice))
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / found[0].filename
        archive.write_bytes(found[0].data)
        for tool in (["7z", "x", f"-p{password}", f"-o{tmp}/7z", str(archive)],
                     ["unzip", "-P", password, "-d", f"{tmp}/unzip", str(archive)]):
            done = subprocess.run(tool, capture_output=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
        # Names are CP932 bytes without the UTF-8 flag (checked byte by byte in
        # tests/unit/test_attachments_zip.py); here: every file comes back intact.
        for tool in ("7z", "unzip"):
            extracted = [p.read_bytes() for p in (Path(tmp) / tool).iterdir()]
            assert sorted(extracted) == sorted(originals.values()), tool
        wrong = subprocess.run(["7z", "x", "-pwrong", f"-o{tmp}/bad", str(archive)],
                               capture_output=True, timeout=60)
        assert wrong.returncode != 0


def test_split_delivery_through_our_mta(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        serve = Serve(tmp_path, policy=POLICY, relay=f"smtp:[127.0.0.1]:{sink.port}",
                      milters="milters: [{name: attachments}]\n")
        serve.config.write_text(serve.config.read_text().replace(
            "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]"))
        serve.start()
        try:
            result = run_swaks(serve.port, mail_from=SENDER, rcpt=[EXTERNAL, INTERNAL],
                               data_file=SAMPLE)
            assert result.code("DATA_END") == 250, result.transcript
            delivered = sort_out(sink)
        finally:
            serve.stop()
    check_split_delivery(delivered)
    log = serve.text()
    assert re.search(r"event=attachments .*action=encrypt .*delivered=re-injected", log), log
    assert "password=" not in log  # never logged unless the policy says so


@dataclass
class BehindPostfix:
    milter: MilterProcess
    sink: SmtpSink
    postfix: PostfixInstance


@contextlib.contextmanager
def behind_postfix(tmp_path: Path, policy: str,
                   reinject_open: bool = True) -> Iterator[BehindPostfix]:
    """The attachments milter behind a private Postfix relaying to a sink; copies and
    notices go back through Postfix's second smtpd without milters (or, with
    `reinject_open` False, to a port where nothing listens)."""
    config, reinject_port = reinjecting_config(tmp_path, policy)
    milter = MilterProcess("attachments", config, tmp_path).start()
    try:
        with SmtpSink() as sink, postfix_instance(
                tmp_path, relay_port=sink.port, smtpd_milters=milter.socket_spec,
                reinject_port=reinject_port if reinject_open else None,
                relay_domains="example.jp, customer.example") as postfix:
            yield BehindPostfix(milter, sink, postfix)
    finally:
        milter.stop()


def test_split_delivery_through_postfix(tmp_path: Path) -> None:
    with behind_postfix(tmp_path, POLICY) as gw:
        result = run_swaks(gw.postfix.smtp_port, mail_from=SENDER, rcpt=[EXTERNAL, INTERNAL],
                           data_file=SAMPLE)
        assert result.code("DATA_END") == 250, result.transcript
        delivered = sort_out(gw.sink)
    check_split_delivery(delivered)


# -- more cases through our MTA -------------------------------------------------------------
class Gateway:
    """`mailmoat serve` with the attachments milter, relaying everything to a sink."""

    def __init__(self, tmp_path: Path, policy: str) -> None:
        self.sink = SmtpSink().start()
        self.serve = Serve(tmp_path, policy=policy, relay=f"smtp:[127.0.0.1]:{self.sink.port}",
                           milters="milters: [{name: attachments}]\n")
        text = self.serve.config.read_text().replace(
            "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]")
        self.serve.config.write_text(text)
        self.serve.start()

    def send(self, raw: bytes, rcpt: list[str], tmp_path: Path) -> str:
        path = tmp_path / "outgoing.eml"
        path.write_bytes(raw)
        result = run_swaks(self.serve.port, mail_from=SENDER, rcpt=rcpt, data_file=path)
        return result.reply_by_stage["DATA_END"]

    def close(self) -> None:
        self.serve.stop()
        self.sink.stop()


def make_message(files: list[tuple[str, bytes]], subject: str = "資料送付") -> bytes:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = EXTERNAL
    message["Subject"] = subject
    message["Message-ID"] = "<made.1@example.jp>"
    message.set_content("資料をお送りします。\n")
    for name, data in files:
        message.add_attachment(data, maintype="application", subtype="octet-stream",
                               filename=name)
    return message.as_bytes(policy=email.policy.SMTP)


def unzip_all(zip_data: bytes, password: str, tmp: Path) -> list[bytes]:
    archive = tmp / "x.zip"
    archive.write_bytes(zip_data)
    done = subprocess.run(["7z", "x", f"-p{password}", f"-o{tmp}/out", str(archive)],
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted(p.read_bytes() for p in (tmp / "out").iterdir())


def test_aes_utf8_many_files_large_file_and_a_keyword(tmp_path: Path) -> None:
    """AES-256 with UTF-8 names; 100 files, a 0-byte one and a 20 MB one; the subject keyword
    forces a ZIP even for a colleague, and is removed from the subject."""
    policy = POLICY.replace("attachments:\n", "attachments:\n  subject_keyword: \"[secure]\"\n"
                            "  encrypt: {encryption: aes256, names: utf-8}\n")
    files = [(f"資料{n:03d}.txt", f"file {n}\n".encode()) for n in range(100)]
    files += [("empty.bin", b""), ("大きなファイル.bin", os.urandom(20 * 1024 * 1024))]
    gateway = Gateway(tmp_path, policy)
    try:
        reply = gateway.send(make_message(files, subject="[secure] 設計資料"), [INTERNAL],
                             tmp_path)
        assert reply.startswith("250"), reply
        items = gateway.sink.wait_for(2, timeout=60)
    finally:
        gateway.close()
    by_rcpt = {rcpt: parsed(item) for item in items for rcpt in item.rcpt_tos}
    zipped, notice = by_rcpt[INTERNAL], by_rcpt[SENDER]
    assert str(zipped["Subject"]) == "設計資料"
    (archive,) = find_attachments(zipped)
    assert archive.data[:4] == b"PK\x03\x04"
    password = password_from(notice_text(notice))
    assert unzip_all(archive.data, password, tmp_path) == sorted(data for _, data in files)


def test_delete_mode_lists_what_was_removed(tmp_path: Path) -> None:
    policy = POLICY.replace("then: {attachments: encrypt}", "then: {attachments: delete}")
    gateway = Gateway(tmp_path, policy)
    try:
        raw = (ROOT / "samples" / "attach-hostile.eml").read_bytes()
        assert gateway.send(raw, [EXTERNAL], tmp_path).startswith("250")
        (item,) = gateway.sink.wait_for(1, timeout=20)
        time.sleep(0.5)
        assert len(gateway.sink.messages) == 1  # no notice: nothing to unlock
    finally:
        gateway.close()
    message = parsed(item)
    assert find_attachments(message) == []
    text = "\n".join(part.get_content() for part in message.walk()
                     if part.get_content_type() == "text/plain")
    for name in ("passwd", "b.txt"):
        assert name in text, text
    assert "\x00" not in text


def test_reinjection_failure_tempfails_the_whole_message(tmp_path: Path) -> None:
    """Nothing is lost or doubled: with the re-injection port closed (behind Postfix), the
    message is refused with 451, and no recipient gets anything."""
    with behind_postfix(tmp_path, POLICY, reinject_open=False) as gw:
        result = run_swaks(gw.postfix.smtp_port, mail_from=SENDER, rcpt=[EXTERNAL, INTERNAL],
                           data_file=SAMPLE)
        time.sleep(1.0)
        delivered = len(gw.sink.messages)
    assert result.reply_by_stage["DATA_END"].startswith("451 4.3.0"), result.transcript
    assert delivered == 0
    assert "event=attachments_failed" in gw.milter.log_text()


# -- offload to Nextcloud (a fake server that speaks its WebDAV and OCS share API) -----------
def offload_policy(cloud_url: str, password_file: Path, on_failure: str) -> str:
    return POLICY.replace("then: {attachments: encrypt}", "then: {attachments: offload}") \
        .replace("attachments:\n", f"""attachments:
  offload:
    on_failure: {on_failure}
    nextcloud: {{url: "{cloud_url}", user: mailmoat, password_file: "{password_file}",
                 timeout: 5s, retries: 0, expire_days: 7}}
""", 1)


def test_offload_puts_the_files_on_nextcloud_behind_the_notice_password(
        tmp_path: Path) -> None:
    import requests

    from tests.harness.nextcloud_fake import NextcloudFake
    secret = tmp_path / "nextcloud-app-password"
    secret.write_text("app-password-1234\n")
    secret.chmod(0o600)  # a secret file readable by every user is refused
    with NextcloudFake() as cloud:
        gateway = Gateway(tmp_path, offload_policy(cloud.url, secret, "tempfail"))
        try:
            assert gateway.send(SAMPLE.read_bytes(), [EXTERNAL, INTERNAL],
                                tmp_path).startswith("250")
            delivered = sort_out(gateway.sink)
        finally:
            gateway.close()
        assert find_attachments(delivered.zipped) == []  # the files are on Nextcloud
        note = "\n".join(p.get_content() for p in delivered.zipped.walk()
                         if p.get_content_type() == "text/plain")
        link = re.search(r"<(http://[^>]+/s/\w+)>", note)
        assert link, note
        (share,) = cloud.shares
        assert share.expiration.isoformat() in note  # an explicit expiry, shown to the reader
        password = password_from(notice_text(delivered.notice))
        assert share.password == password
        original = email.message_from_bytes(SAMPLE.read_bytes(), policy=email.policy.default)
        (pdf,) = find_attachments(original)
        with requests.Session() as browser:
            browser.trust_env = False
            got = browser.get(f"{link.group(1)}/download", params={"path": "/",
                              "files": pdf.filename}, auth=("anonymous", password), timeout=5)
            assert got.status_code == 200 and got.content == pdf.data
            refused = browser.get(link.group(1), auth=("anonymous", "wrong"), timeout=5)
            assert refused.status_code in (401, 403)
        # The internal colleague got the original with its attachment.
        assert [a.data for a in find_attachments(delivered.original)] == [pdf.data]


@pytest.mark.parametrize("on_failure", ["encrypt", "tempfail"])
def test_nextcloud_down_falls_back_as_the_policy_says(tmp_path: Path, on_failure: str) -> None:
    from tests.harness.nextcloud_fake import NextcloudFake
    secret = tmp_path / "nextcloud-app-password"
    secret.write_text("app-password-1234\n")
    secret.chmod(0o600)  # a secret file readable by every user is refused
    with NextcloudFake() as cloud:
        cloud.fail_next(50, 503)
        gateway = Gateway(tmp_path, offload_policy(cloud.url, secret, on_failure))
        try:
            reply = gateway.send(SAMPLE.read_bytes(), [EXTERNAL, INTERNAL], tmp_path)
            if on_failure == "encrypt":
                delivered = sort_out(gateway.sink)
            else:
                time.sleep(1.0)
                count = len(gateway.sink.messages)
        finally:
            gateway.close()
    if on_failure == "tempfail":
        assert reply.startswith("451 4.3.0"), reply
        assert count == 0
        assert "event=offload_failed" in gateway.serve.text()
        return
    assert reply.startswith("250"), reply
    check_split_delivery(delivered)  # the ZIP, the original, one notice


def zip_entry_names(data: bytes) -> list[tuple[bytes, int]]:
    """(raw name bytes, general purpose flags) of each central directory entry."""
    import struct
    found, at = [], 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        flags = struct.unpack_from("<H", data, at + 8)[0]
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        found.append((data[at + 46:at + 46 + name_len], flags))
        at += 46 + name_len
    return found


@pytest.mark.parametrize("sample,names", [
    ("attach-ja-rfc2231.eml", ["①御見積書_㈱髙山製作所様.pdf", "顧客リスト.csv"]),
    # Two attachments with the same raw Shift_JIS name: the second becomes "(1)".
    ("attach-ja-sjis-raw.eml", ["ソフト保守_予算表.csv", "ソフト保守_予算表(1).csv"]),
])
def test_japanese_names_reach_the_zip_in_cp932_without_the_utf8_flag(
        tmp_path: Path, sample: str, names: list[str]) -> None:
    gateway = Gateway(tmp_path, POLICY)
    try:
        raw = (ROOT / "samples" / sample).read_bytes()
        assert gateway.send(raw, [EXTERNAL], tmp_path).startswith("250")
        items = gateway.sink.wait_for(2, timeout=20)
    finally:
        gateway.close()
    (copy,) = [parsed(i) for i in items if EXTERNAL in i.rcpt_tos]
    (archive,) = find_attachments(copy)
    entries = zip_entry_names(archive.data)
    assert [name.decode("cp932") for name, _ in entries] == names
    assert all(flags & 0x0800 == 0 and flags & 0x0001 for _, flags in entries)  # CP932, encrypted


def test_scan_shows_the_copies_and_notices_the_milter_hands_back(tmp_path: Path) -> None:
    """`mailmoat scan` catches what the milter re-injects instead of sending it anywhere."""
    import json
    import sys
    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "config.yaml"
    config.write_text("gateway: {hostname: mx.example.jp}\nstore: memory://\n"
                      "milters: [{name: attachments}]\npolicy: policy.yaml\n")
    done = subprocess.run([sys.executable, "-m", "mta.cli", "scan", str(SAMPLE), "--config",
                           str(config), "--client-ip", "127.0.0.1", "--mail-from", SENDER,
                           "--rcpt", EXTERNAL, "--rcpt", INTERNAL, "--json", "--user", "root"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "accept"
    assert report["envelope"]["recipients"] == [INTERNAL]  # the external one was taken off
    handed_back = {tuple(item["recipients"]): item for item in report["reinjected"]}
    assert set(handed_back) == {(EXTERNAL,), (SENDER,)}
    assert "パスワード" in handed_back[(SENDER,)]["subject"]


def test_concurrent_sessions_behind_postfix_do_not_crash_the_milter(tmp_path: Path) -> None:
    """Several SMTP sessions at once, each getting a ZIP: libarchive's callbacks into Python
    must not run on libmilter's threads (that crashed the milter with SIGSEGV)."""
    message = tmp_path / "typical.eml"
    message.write_bytes(make_message([("見積書.pdf", os.urandom(1_200_000)),
                                      ("顧客リスト.csv", "x,y\n".encode() * 80_000)])
                        .replace(b"\r\n", b"\n"))  # smtp-source -F wants LF line ends
    with behind_postfix(tmp_path, "internal_networks: [127.0.0.0/8]\n"
                                  "defaults: {attachments: encrypt}\n") as gw:
        done = subprocess.run(["/usr/sbin/smtp-source", "-c", "-F", str(message), "-m", "24",
                               "-s", "4", "-f", SENDER, "-t", EXTERNAL,
                               f"127.0.0.1:{gw.postfix.smtp_port}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr + gw.milter.log_text()[-2000:]
        gw.sink.wait_for(48, timeout=60)  # each message: its ZIP copy and one notice
        assert gw.milter.proc is not None and gw.milter.proc.poll() is None, \
            gw.milter.log_text()[-2000:]


# -- limits and secrets ----------------------------------------------------------------------
def test_attachments_over_max_total_size_are_tempfailed_not_passed(tmp_path: Path) -> None:
    """A sender who piles attachments beyond max_total_size gets 451 4.3.4 (the message is
    neither zipped nor let through in the clear); the limit counts decoded bytes, so one
    whose base64 is over the limit but whose content is not still goes through, zipped."""
    policy = POLICY.replace("attachments:\n", "attachments:\n  max_total_size: 65536\n")
    gateway = Gateway(tmp_path, policy)
    try:
        over = make_message([("a.bin", os.urandom(40_000)), ("b.bin", os.urandom(30_000))])
        reply = gateway.send(over, [EXTERNAL], tmp_path)
        assert reply.startswith("451 4.3.4"), reply
        under = make_message([("c.bin", os.urandom(60_000))])  # ~81 kB of base64
        assert len(under) > 65536
        assert gateway.send(under, [EXTERNAL], tmp_path).startswith("250")
        items = gateway.sink.wait_for(2, timeout=20)  # the zipped copy and its notice
        time.sleep(0.5)
        delivered = list(gateway.sink.messages)
    finally:
        gateway.close()
    assert len(delivered) == 2, [(i.mail_from, i.rcpt_tos) for i in delivered]
    zipped = next(parsed(i) for i in items if EXTERNAL in i.rcpt_tos)
    assert [a.content_type for a in find_attachments(zipped)] == ["application/zip"]
    log = gateway.serve.text()
    assert re.search(r"event=attachments_failed .*max_total_size \(65536 bytes\)", log), log


def test_a_partner_password_file_every_user_can_read_tempfails(tmp_path: Path) -> None:
    """The agreed password is refused from a file every local user can read: the message is
    tempfailed (never sent in the clear nor zipped with another password), and the log says
    why without the password."""
    secret = tmp_path / "partner.pass"
    secret.write_text("Partner%Y%m\n")
    secret.chmod(0o644)
    policy = POLICY.replace("attachments:\n", "attachments:\n  encrypt: {password: {fixed: "
                            f"[{{recipients: ['@customer.example'], password_file: "
                            f"'{secret}'}}]}}}}\n")
    gateway = Gateway(tmp_path, policy)
    try:
        reply = gateway.send(SAMPLE.read_bytes(), [EXTERNAL], tmp_path)
        time.sleep(0.5)
        delivered = len(gateway.sink.messages)
    finally:
        gateway.close()
    assert reply.startswith("451 4.3.0"), reply
    assert delivered == 0
    log = gateway.serve.text()
    assert "readable by every user" in log and "Partner" not in log, log


# -- fail closed on MIME that cannot be classified with certainty (issue 14) ----------------
EVERYTHING = """\
internal_networks: [127.0.0.0/8]
attachments:
  notice: {to: sender, language: ja}
rules:
  - name: encrypt-everything
    when: {direction: outbound}
    then: {attachments: encrypt}
"""


def test_broken_mime_never_leaves_a_file_in_the_clear_through_our_mta(tmp_path: Path) -> None:
    """Every case of tests/harness/attfail_cases.py through `mailmoat serve` and the real
    milter: each hidden file is inside the ZIP (7z, byte for byte), none in the clear."""
    from tests.harness.attfail_cases import CASES, check_protected, notice_password
    gateway = Gateway(tmp_path, EVERYTHING.replace("attachments:\n",
                                                   "attachments:\n  on_unparsable: "
                                                   "encrypt_whole\n"))
    try:
        for n, case in enumerate(CASES):
            gateway.sink.clear()
            reply = gateway.send(case.raw, [EXTERNAL], tmp_path)
            if not reply.startswith("250"):  # refused (our MTA: bare CR): nothing goes out
                assert reply[:1] in "45", (case.name, reply)
                time.sleep(0.5)
                assert gateway.sink.messages == [], case.name
                continue
            items = gateway.sink.wait_for(2, timeout=30)
            by_rcpt = {rcpt: item for item in items for rcpt in item.rcpt_tos}
            assert set(by_rcpt) == {EXTERNAL, SENDER}, (case.name, list(by_rcpt))
            check_protected(case, by_rcpt[EXTERNAL].data, notice_password(
                by_rcpt[SENDER].data), tmp_path / str(n))
    finally:
        gateway.close()
    log = gateway.serve.text()
    assert "event=attachments_unparsable" in log and "event=attachments_doubted" in log, log


def test_on_unparsable_tempfail_through_postfix(tmp_path: Path) -> None:
    """Behind Postfix, with on_unparsable: tempfail, a multipart without its closing
    delimiter is answered 451 4.3.0, logged, and nothing is delivered."""
    from tests.harness.attfail_cases import CASES
    (case,) = [c for c in CASES if c.name == "missing-final-boundary"]
    policy = EVERYTHING.replace("attachments:\n", "attachments:\n  on_unparsable: tempfail\n")
    path = tmp_path / "broken.eml"
    path.write_bytes(case.raw)
    with behind_postfix(tmp_path, policy) as gw:
        result = run_swaks(gw.postfix.smtp_port, mail_from=SENDER, rcpt=[EXTERNAL],
                           data_file=path)
        time.sleep(1.0)
        delivered = len(gw.sink.messages)
    assert result.reply_by_stage["DATA_END"].startswith("451 4.3.0"), result.transcript
    assert delivered == 0
    log = gw.milter.log_text()
    assert "event=attachments_unparsable" in log and "then=tempfail" in log, log


def test_a_non_ascii_message_id_still_gets_its_notice_through_postfix(tmp_path: Path) -> None:
    """`<x@example.срб>` as Message-ID and in References (8-bit headers, RFC 6532): no 451;
    the ZIP goes out and the notice too, without the identifier it cannot carry."""
    raw = make_message([("a.bin", b"\x00\x01 data")]).replace(
        b"Message-ID: <made.1@example.jp>",
        "Message-ID: <x@example.срб>\r\nReferences: <a@example.jp> <y@例え.jp>".encode())
    path = tmp_path / "idn.eml"
    path.write_bytes(raw)
    with behind_postfix(tmp_path, EVERYTHING) as gw:
        result = run_swaks(gw.postfix.smtp_port, mail_from=SENDER, rcpt=[EXTERNAL],
                           data_file=path)
        assert result.code("DATA_END") == 250, result.transcript
        items = gw.sink.wait_for(2, timeout=30)
    by_rcpt = {rcpt: item for item in items for rcpt in item.rcpt_tos}
    notice = parsed(by_rcpt[SENDER])
    assert notice["References"] == "<a@example.jp>"
    assert notice["In-Reply-To"] is None
    assert [a.content_type for a in find_attachments(parsed(by_rcpt[EXTERNAL]))] == \
        ["application/zip"]
    assert "event=notice_id_dropped" in gw.milter.log_text()


def test_what_we_write_behind_postfix_is_valid_mime(tmp_path: Path) -> None:
    """A UTF-8 BOM before the first field, a fold without indentation, MIME-Version and
    Content-Type twice: behind real Postfix, the delivered copy has exactly one of each
    top-level MIME header, re-parses without a defect the input lacked, and holds the file
    in the ZIP only."""
    import base64

    from tests.harness.attfail_cases import HEAD, Case, Hidden, check_protected, \
        notice_password
    data = bytes(range(256)) * 3
    wire = base64.encodebytes(data).replace(b"\n", b"\r\n")
    body = (b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\n"
            b"Content-Type: application/octet-stream; name=a.bin\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + wire + b"--b--\r\n")
    cases = [
        Case("bom", b"\xef\xbb\xbfMIME-Version: 1.0\r\n" + HEAD.replace(
            b"MIME-Version: 1.0\r\n", b"") + b"Content-Type: multipart/mixed; boundary=b"
            b"\r\n\r\n" + body, (Hidden(wire, data),)),
        Case("broken-fold", HEAD + b"Content-Type: multipart/mixed;\r\nboundary=b\r\n\r\n"
             + body, (Hidden(wire, data),)),
        Case("twice", HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
             b"boundary=b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + body,
             (Hidden(wire, data),)),
    ]
    with behind_postfix(tmp_path, EVERYTHING) as gw:
        for n, case in enumerate(cases):
            gw.sink.clear()
            path = tmp_path / f"{case.name}.eml"
            path.write_bytes(case.raw)
            result = run_swaks(gw.postfix.smtp_port, mail_from=SENDER, rcpt=[EXTERNAL],
                               data_file=path)
            assert result.code("DATA_END") == 250, (case.name, result.transcript)
            items = gw.sink.wait_for(2, timeout=30)
            by_rcpt = {rcpt: item for item in items for rcpt in item.rcpt_tos}
            out = by_rcpt[EXTERNAL].data
            message = email.message_from_bytes(out, policy=email.policy.default)
            names = [name.lower() for name in message.keys()]
            assert names.count("mime-version") == 1, (case.name, names)
            assert names.count("content-type") == 1, (case.name, names)
            assert names.count("content-transfer-encoding") <= 1, (case.name, names)
            new = {type(d).__name__ for p in message.walk() for d in p.defects}
            assert not new, (case.name, new, out[:2000])
            check_protected(case, out, notice_password(by_rcpt[SENDER].data),
                            tmp_path / str(n))
