"""How fast the attachments milter writes its encrypted ZIP, against 7-Zip, and its memory.

    .venv/bin/python bench/zip.py [--quick] [--skip-milter]

Part 1: MB/s of write_zip (ZipCrypto and AES-256) on a 10 MiB incompressible file and a
10 MiB text file, against `7z a -tzip -mx=1` with the same encryption on the same files,
alternated over rounds. Part 2: peak RSS of a fresh process zipping one 20 MiB attachment.
Part 3 (needs root; --skip-milter leaves it out): `mailmoat milter attachments` behind a
private Postfix relaying to smtp-sink. 3a: messages/s of a typical 2 MB two-attachment mail
from smtp-source, every one zipped (a copy in place plus a password notice re-injected),
against Postfix alone and Postfix with a do-nothing pymilter, at concurrency 1 and 4,
alternated over rounds. 3b: peak RSS of a fresh milter process while one mail with a 20 MiB
attachment goes through it.

Everything lives in one temporary directory, removed at the end (also on Ctrl-C/SIGTERM);
everything listens on 127.0.0.1 or a unix socket in it; every 7z run, every smtp-source run
and every wait has a time limit, every loop a bound in count and time; every process started
here is stopped before exit. Exit status 0 unless something could not run or a check failed
(missed targets are reported, not failures). See bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import email.utils
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path

from _common import SMTP_SINK, SMTP_SOURCE, smtp_sink, LogCounter, cpu_seconds, sink_messages
from _common import smtp_source as run_smtp_source
from _common import (ROOT, machine_line, postfix_version, BenchError, child_process, run_bench,
                     median, table, verdict, wait_until, world_readable_tmpdir)

from libarchive import ffi  # noqa: E402  (after _common put the project on sys.path)

from milters.attachments import zipper  # noqa: E402
from milters.attachments.zipper import ZipEntry, write_zip  # noqa: E402
from tests.harness.milter_proc import MilterProcess  # noqa: E402
from tests.harness.ports import LOOPBACK, free_port  # noqa: E402
from tests.harness.postfix import PostfixInstance  # noqa: E402
from tests.harness.sink import SmtpSink  # noqa: E402

SIZE = 10 * 1024 * 1024
BIG = 20 * 1024 * 1024  # Part 2's attachment
PASSWORD = "Kx7mR4pWz9aT"
# Our deflate level against 7z -mx=1: both tools' fastest deflate setting (zlib level 1;
# 7-Zip's own deflate encoder in its fastest mode, which packs text tighter than zlib's 1).
FAIR_LEVEL, DEFAULT_LEVEL = 1, 6
TARGETS = {"aes256": 1.0, "zipcrypto": 0.8}  # our speed / 7z's at FAIR_LEVEL
SEVEN_ZIP = {"aes256": "AES256", "zipcrypto": "ZipCrypto"}  # -mem= values


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int
    milter: bool = True  # run Part 3
    milter_messages: int = 40  # smtp-source -m per Part 3a run
    milter_rounds: int = 5
    milter_budget: float = 300.0  # seconds: no new Part 3a round starts after this

    @classmethod
    def make(cls, quick: bool, milter: bool = True) -> "Settings":
        if quick:
            return cls(quick, rounds=3, milter=milter, milter_messages=10, milter_rounds=3,
                       milter_budget=60.0)
        return cls(quick, rounds=9, milter=milter)


@dataclass
class Variant:
    source: str  # "random" or "text"
    encryption: str
    tool: str  # "ours" or "7z"
    level: int  # ours: deflate level; 7z: -mx
    sampled: bool = True  # ours: False = deflate even what does not shrink (diagnostic)
    times: list[float] = field(default_factory=list)
    size: int = 0  # bytes of the ZIP

    @property
    def label(self) -> str:
        if self.tool == "7z":
            return f"7z a -tzip -mx={self.level} -mem={SEVEN_ZIP[self.encryption]}"
        if not self.sampled:
            return f"write_zip level {self.level}, always deflate"
        return f"write_zip level {self.level}" + (" (default)" if self.level == DEFAULT_LEVEL
                                                  else "")


# == inputs ================================================================================
TEXT_LINES = [
    "お世話になっております。見積書（最終版）を添付いたしますので、ご確認のほどよろしくお願いいたします。",
    "Please find attached the revised quotation; prices are valid until the end of the month.",
    "品番 A-{n:05d}　数量 {q} 個　単価 {p:,} 円　納期 2026年{m}月{d}日",
    "Item A-{n:05d}, quantity {q}, unit price JPY {p:,}, delivery 2026-{m:02d}-{d:02d}.",
    "株式会社髙橋商事 営業部 第{m}課 担当：山田 （内線 {q}）",
]


def make_text(size: int) -> bytes:
    """Repetitive Japanese and English business text, as UTF-8: what mail attachments
    (CSV, logs, plain documents) look like, compressible but not trivially."""
    out, n = [], 0
    total = 0
    while total < size:
        line = TEXT_LINES[n % len(TEXT_LINES)].format(
            n=n, q=n % 97 + 1, p=(n * 7919) % 100_000, m=n % 12 + 1, d=n % 28 + 1) + "\n"
        data = line.encode()
        out.append(data)
        total += len(data)
        n += 1
    return b"".join(out)[:size]


# == Part 1 ================================================================================
def run_ours(variant: Variant, source: Path, target: Path) -> float:
    """From the file on disk to a ZIP on disk, as 7z does (page cache both ways, no fsync)."""
    worth_deflating = zipper._worth_deflating
    if not variant.sampled:  # what the sampling saves: deflate everything, as 7z does
        zipper._worth_deflating = lambda data: True
    try:
        start = time.perf_counter()
        data = source.read_bytes()
        with open(target, "wb") as out:
            write_zip(out, [ZipEntry(source.name, data, mtime=source.stat().st_mtime)],
                      password=PASSWORD, encryption=variant.encryption, level=variant.level)
        return time.perf_counter() - start
    finally:
        zipper._worth_deflating = worth_deflating


def run_7z(variant: Variant, source: Path, target: Path) -> float:
    target.unlink(missing_ok=True)  # 7z a would update an existing archive
    argv = ["7z", "a", "-tzip", f"-mx={variant.level}", f"-mem={SEVEN_ZIP[variant.encryption]}",
            f"-p{PASSWORD}", "-bd", str(target), str(source)]
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}:"
                         f" {proc.stdout.decode(errors='replace')[-500:]}")
    return wall


def check_zip(path: Path, source: Path, tmp: Path) -> str:
    """7z extracts the ZIP with the password to the source's bytes; returns its method."""
    dest = tmp / "check"
    shutil.rmtree(dest, ignore_errors=True)
    proc = subprocess.run(["7z", "x", "-y", f"-p{PASSWORD}", f"-o{dest}", str(path)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    got = dest / source.name
    if proc.returncode != 0 or not got.exists() or got.read_bytes() != source.read_bytes():
        raise BenchError(f"{path.name}: 7z could not extract {source.name} intact"
                         f" (exit {proc.returncode})")
    listing = subprocess.run(["7z", "l", "-slt", f"-p{PASSWORD}", str(path)],
                             capture_output=True, text=True, timeout=60).stdout
    shutil.rmtree(dest, ignore_errors=True)
    found = re.search(r"^Method = (.+)$", listing, re.M)
    return found.group(1) if found else "?"


def seven_zip_startup(tmp: Path, rounds: int) -> float:
    """What starting 7z costs, in every one of its timings: `7z a` of a 1-byte file."""
    tiny, target = tmp / "tiny.txt", tmp / "tiny.zip"
    tiny.write_bytes(b"x")
    probe = Variant("tiny", "zipcrypto", "7z", 1)
    return median([run_7z(probe, tiny, target) for _ in range(rounds)])


def part1(settings: Settings, tmp: Path) -> tuple[list[Variant], dict[str, str], float]:
    sources = {"random": tmp / "random.bin", "text": tmp / "text.txt"}
    sources["random"].write_bytes(os.urandom(SIZE))
    sources["text"].write_bytes(make_text(SIZE))
    variants = []
    for src in sources:
        for enc in ("zipcrypto", "aes256"):
            variants += [Variant(src, enc, "ours", FAIR_LEVEL),
                         Variant(src, enc, "ours", DEFAULT_LEVEL)]
            if src == "random":
                variants.append(Variant(src, enc, "ours", FAIR_LEVEL, sampled=False))
            variants.append(Variant(src, enc, "7z", 1))
    methods: dict[str, str] = {}
    for v in variants:  # warm-up and correctness: every ZIP must open with the password
        target = tmp / "out.zip"
        (run_ours if v.tool == "ours" else run_7z)(v, sources[v.source], target)
        v.size = target.stat().st_size
        methods[f"{v.source}/{v.encryption}/{v.label}"] = check_zip(target, sources[v.source],
                                                                     tmp)
    for rnd in range(settings.rounds):
        shift = rnd % len(variants)  # rotate so no variant always runs first
        for v in variants[shift:] + variants[:shift]:
            target = tmp / "out.zip"
            run = run_ours if v.tool == "ours" else run_7z
            v.times.append(run(v, sources[v.source], target))
    startup = seven_zip_startup(tmp, settings.rounds)
    return variants, methods, startup


def print_part1(settings: Settings, variants: list[Variant], methods: dict[str, str],
                startup: float) -> None:
    print(f"Part 1: MB/s (10^6 bytes of input per second, file on disk to ZIP on disk) for"
          f" {SIZE:,}-byte inputs; median of {settings.rounds} rounds, variants alternated;"
          f" ratio = median of per-round (our speed / 7z's)")
    rows = []
    for v in variants:
        peer = next(p for p in variants
                    if p.tool == "7z" and (p.source, p.encryption) == (v.source, v.encryption))
        speeds = [SIZE / t / 1e6 for t in v.times]
        ratio_cell = ""
        if v.tool == "ours":
            ratio = median([p / t for t, p in zip(v.times, peer.times)])
            target = TARGETS[v.encryption]
            ratio_cell = (f"{ratio:.2f} {verdict(ratio >= target)} (>= {target:.1f})"
                          if v.level == FAIR_LEVEL and v.sampled else f"{ratio:.2f} (info)")
        rows.append([v.source, v.encryption, v.label, f"{median(speeds):.1f}",
                     f"{min(speeds):.1f}..{max(speeds):.1f}", f"{v.size:,}",
                     methods[f"{v.source}/{v.encryption}/{v.label}"], ratio_cell])
    print(table(["input", "encryption", "writer", "MB/s", "min..max", "ZIP bytes",
                 "method (7z l)", "ratio vs 7z -mx=1"], rows,
                right=[False, False, False, True, True, True, False, False]))
    print(f"  7z's times include starting the process: `7z a` of a 1-byte file takes"
          f" {startup * 1e3:.0f} ms here.\n"
          f"  Level {FAIR_LEVEL} is compared with 7z -mx=1 (both tools' fastest deflate);"
          f" level {DEFAULT_LEVEL} is write_zip's default.\n"
          "  always deflate: write_zip with its sampling turned off (an entry whose samples do"
          " not shrink is stored\n  without deflating it); 7z deflates everything and stores"
          " what did not shrink.\n"
          "  Checks: every ZIP above was extracted by 7z with the password to the input's"
          " bytes.")


# == Part 2 ================================================================================
PEAK_SCRIPT = """
import io, os, re, sys, tempfile
from milters.attachments.zipper import write_zip, ZipEntry
def hwm():
    return int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024
write_zip(io.BytesIO(), [ZipEntry('warm.txt', b'x' * 1000)], password='pw12')
base = hwm()
data = os.urandom(int(sys.argv[1]))
out = tempfile.SpooledTemporaryFile(max_size=int(sys.argv[2]), dir=sys.argv[3])
written = write_zip(out, [ZipEntry('big.bin', data)], password='pw12',
                    encryption=sys.argv[4])
print(base, hwm(), written, out._rolled)
"""


@dataclass(frozen=True)
class PeakRow:
    label: str
    base: int
    peak: int
    written: int


def part2(tmp: Path) -> list[PeakRow]:
    """VmHWM (not ru_maxrss, which Linux carries over execve from the parent) of a fresh
    process: after imports and a warm-up ZIP, and after zipping the attachment."""
    rows = []
    for encryption in ("zipcrypto", "aes256"):
        for spool, max_size in (("in memory", 4 * BIG), ("spooled to disk", 1024 * 1024)):
            proc = subprocess.run(
                [sys.executable, "-c", PEAK_SCRIPT, str(BIG), str(max_size), str(tmp),
                 encryption], capture_output=True, text=True, timeout=300, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                raise BenchError(f"peak RSS probe failed: {proc.stderr[-1000:]}")
            base, peak, written, rolled = proc.stdout.split()
            if rolled != str(spool != "in memory"):
                raise BenchError(f"SpooledTemporaryFile {spool}: rolled over = {rolled}")
            rows.append(PeakRow(f"{encryption}, ZIP {spool}", int(base), int(peak),
                                int(written)))
    return rows


def print_part2(rows: list[PeakRow]) -> None:
    print(f"Part 2: peak RSS (VmHWM) of a fresh process writing one {BIG:,}-byte incompressible"
          " attachment into a SpooledTemporaryFile")
    body = [[r.label, f"{r.base / 2**20:.1f}", f"{r.peak / 2**20:.1f}", f"{r.written:,}",
             f"{r.peak / BIG:.2f}x {verdict(r.peak <= 3 * BIG)}", f"{(r.peak - r.base) / BIG:.2f}x"]
            for r in rows]
    print(table(["case", "start MiB", "peak MiB", "ZIP bytes", "peak / attachment (<= 3x)",
                 "growth / attachment"], body))
    print("  start: after Python, libarchive and a warm-up ZIP; growth includes the"
          " attachment itself (1.00x).")


# == Part 3: the attachments milter behind Postfix =========================================
POSTFIX = "/usr/sbin/postfix"
SENDER, RECIPIENT = "hanako@example.jp", "buyer@customer.example"
# The warm-up's check message and its notice (to the envelope sender) go to a Python sink
# that keeps them, through transport_maps; everything else goes to smtp-sink, which counts.
CHECK_SENDER, CHECK_RECIPIENT = "check@example.jp", "check@customer.example"
# smtp-source's client is 127.0.0.1, inside: every message gets its attachments zipped.
MILTER_POLICY = "internal_networks: [127.0.0.0/8]\ndefaults: {attachments: encrypt}\n"
CONCURRENCIES = (1, 4)
TYPICAL_SIZES = (1_200_000, 300_000)  # bytes of the PDF-like file and of the CSV
MAILLOG_BAD = re.compile(r"milter-(reject|hold|discard)|NOQUEUE: reject|"
                         r"status=(deferred|bounced)|warning:.*milter|fatal:|panic:")
MILTER_LOG_BAD = re.compile(r"event=(milter_error|attachments_failed|offload_failed|"
                            r"message_refused)|Traceback")
# key=value, the value possibly double-quoted with backslash escapes (milters/core/eventlog).
LOG_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')

BODY = """\
株式会社カスタマー
購買部 御中

いつも大変お世話になっております。高橋商事 営業部の山田でございます。

先日お問い合わせいただきました件につきまして、御見積書と明細（CSV）を
添付にてお送りいたします。ご査収のほど、よろしくお願い申し上げます。

なお、御見積の有効期限は発行日より30日間となっております。
ご不明な点がございましたら、お気軽にお問い合わせください。

引き続きよろしくお願いいたします。

--
株式会社高橋商事 営業部 第二課
山田 花子 <hanako@example.jp>
TEL 03-1234-5678
"""

# (file name, MIME type, bytes, extra Content-Type parameters)
Attachment = tuple[str, str, bytes, dict[str, str]]


def pdf_like(size: int) -> bytes:
    """A PDF's first and last lines around random bytes: as incompressible as a real one."""
    head, tail = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", b"\n%%EOF\n"
    return head + os.urandom(size - len(head) - len(tail)) + tail


def csv_rows(size: int) -> bytes:
    """Quotation lines as Japanese Excel saves a CSV: Shift_JIS (cp932), CRLF; about `size`."""
    out, total, n = [], 0, 0
    while total < size:
        text = ("品番,品名,数量,単価,金額,納期\r\n" if n == 0 else
                f"A-{n:05d},部品{n % 50:02d}型（標準）,{n % 97 + 1},{(n * 7919) % 100_000},"
                f"{(n % 97 + 1) * ((n * 7919) % 100_000)},2026/{n % 12 + 1:02d}/{n % 28 + 1:02d}"
                "\r\n")
        line = text.encode("cp932")
        out.append(line)
        total += len(line)
        n += 1
    return b"".join(out)


def build_mail(subject: str, files: list[Attachment]) -> bytes:
    """A MIME mail from SENDER to RECIPIENT (the header addresses only: smtp-source sets the
    envelope): the ISO-2022-JP body, then the attachments in base64, with LF line ends,
    since smtp-source -F reads lines and sends each with CRLF."""
    msg = EmailMessage()
    msg["From"] = f"山田 花子 <{SENDER}>"
    msg["To"] = f"購買部 ご担当者様 <{RECIPIENT}>"
    msg["Subject"] = subject
    msg["Date"] = email.utils.format_datetime(datetime.now().astimezone())
    msg["Message-ID"] = email.utils.make_msgid(domain="example.jp")
    msg.set_content(BODY, charset="iso-2022-jp")
    for name, ctype, data, params in files:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name,
                           params=params)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\n"))


def typical_files() -> list[Attachment]:
    return [("御見積書_No.2026-1201.pdf", "application/pdf", pdf_like(TYPICAL_SIZES[0]), {}),
            ("明細_2026年12月.csv", "text/csv", csv_rows(TYPICAL_SIZES[1]),
             {"charset": "Shift_JIS"})]


def milter_config(workdir: Path, reinject_port: int) -> Path:
    workdir.mkdir(parents=True)
    (workdir / "policy.yaml").write_text(MILTER_POLICY)
    config = workdir / "config.yaml"
    config.write_text(f"gateway: {{hostname: mx.example.jp, reinject_listen:"
                      f" {LOOPBACK}:{reinject_port}}}\nstore: memory://\npolicy: policy.yaml\n")
    return config


def private_postfix(relay_port: int, milters: str, base_dir: Path,
                    reinject_port: int | None = None,
                    extra: dict[str, str] | None = None) -> PostfixInstance:
    return PostfixInstance(relay_port=relay_port, smtpd_milters=milters,
                           reinject_port=reinject_port,
                           relay_domains="example.jp, customer.example", base_dir=base_dir,
                           # Postfix's default connection cache (the harness turns it off):
                           # fewer sessions to the sink, less CPU taken from what we time.
                           extra={"smtp_connection_cache_on_demand": "yes", **(extra or {})})


@dataclass
class Relay:
    key: str
    label: str
    milters: str = ""  # smtpd_milters
    per_message: int = 1  # deliveries for each message sent (the milter adds a notice)
    postfix: PostfixInstance | None = None
    pid: int = 0  # the milter process, if any
    sent: int = 0  # messages smtp-source sent through it to smtp-sink, warm-up included
    checked: int = 0  # messages sent to the check sink
    times: dict[int, list[float]] = field(default_factory=dict)  # concurrency -> seconds
    cpu: dict[int, float] = field(default_factory=dict)  # milter CPU seconds, timed runs
    timed: dict[int, int] = field(default_factory=dict)  # messages in the timed runs


@dataclass
class Rig:
    sink_log: Path
    expected: int = 0  # deliveries smtp-sink must have counted so far
    last_log: str = ""  # the maillog lines of the last run

    def send(self, relay: Relay, count: int, concurrency: int, message_file: Path,
             sender: str = SENDER, recipient: str = RECIPIENT, counted: bool = True,
             per_message: int | None = None) -> float:
        """One smtp-source run; then wait (bounded) until Postfix delivered all of it, so
        runs never overlap and the milter's CPU covers whole messages. Any refusal, deferral
        or milter warning in the maillog, or a wrong count at the sink, ends the run."""
        assert relay.postfix is not None
        counter = LogCounter(relay.postfix, MAILLOG_BAD)
        try:
            wall = run_smtp_source(relay.postfix.smtp_port, count, concurrency, sender,
                                   recipient, message_file)
        except BenchError as exc:
            raise BenchError(f"{relay.label}, c={concurrency}: {exc}; maillog:\n"
                             + "\n".join(counter.problems()[:10])) from None
        if counted:
            relay.sent += count
        else:
            relay.checked += count
        deliveries = count * (relay.per_message if per_message is None else per_message)
        try:
            wait_until(lambda: counter.sent() >= deliveries, 60 + count,
                       f"{deliveries} deliveries by Postfix ({relay.label})", interval=0.05)
        except BenchError as exc:
            raise BenchError(f"{exc}; maillog:\n{counter.text()[-3000:]}") from None
        problems = counter.problems()
        if problems:
            raise BenchError(f"{relay.label}: refused, deferred or milter trouble:\n"
                             + "\n".join(problems[:10]))
        if counter.sent() != deliveries:
            raise BenchError(f"{relay.label}: {counter.sent()} deliveries for {count}"
                             f" messages, expected {deliveries}")
        self.last_log = counter.text()
        if counted:
            self.expected += deliveries
            with contextlib.suppress(BenchError):  # the comparison below says what is wrong
                wait_until(lambda: sink_messages(self.sink_log) >= self.expected, 30,
                           "smtp-sink's count")
            got = sink_messages(self.sink_log)
            if got != self.expected:
                raise BenchError(f"{relay.label}: smtp-sink counted {got} messages in all,"
                                 f" expected {self.expected}")
        return wall


def check_encrypted(rig: Rig, relay: Relay, check_sink: SmtpSink, message_file: Path,
                    originals: list[bytes], tmp: Path) -> str:
    """One message through the milter to the check sink: the recipient's copy must hold one
    application/zip part and no original attachment, the notice must reach the sender from
    <>, and 7z must extract the originals from the ZIP with the notice's password."""
    before = len(check_sink.messages)
    rig.send(relay, 1, 1, message_file, CHECK_SENDER, CHECK_RECIPIENT, counted=False)
    try:
        got = check_sink.wait_for(before + 2, timeout=30)[before:]
    except TimeoutError as exc:
        raise BenchError(f"{relay.label}: the check message and notice: {exc}") from None
    copies = [m for m in got if m.rcpt_tos == (CHECK_RECIPIENT,)]
    notices = [m for m in got if m.rcpt_tos == (CHECK_SENDER,) and m.mail_from in ("", "<>")]
    if len(copies) != 1 or len(notices) != 1 or len(got) != 2:
        raise BenchError(f"{relay.label}: expected one copy and one notice at the check sink,"
                         f" got {[(m.mail_from, m.rcpt_tos) for m in got]}")
    copy = email.message_from_bytes(copies[0].data, policy=email.policy.default)
    leaves = [part for part in copy.walk() if not part.is_multipart()]
    zips = [part for part in leaves if part.get_content_type() == "application/zip"]
    kept = [part.get_content_type() for part in leaves
            if part.get_content_type() in ("application/pdf", "text/csv")]
    if len(zips) != 1 or kept:
        raise BenchError(f"{relay.label}: the delivered copy has parts"
                         f" {[p.get_content_type() for p in leaves]}: expected one"
                         " application/zip instead of the attachments")
    notice = email.message_from_bytes(notices[0].data, policy=email.policy.default)
    text = notice.get_content() if not notice.is_multipart() else ""
    found = re.search(r"■パスワード\s*\n\s*(\S+)", text if isinstance(text, str) else "")
    if not found:
        raise BenchError(f"{relay.label}: no password in the notice:\n{text!s:.1000}")
    data = zips[0].get_content()
    archive, dest = tmp / "check.zip", tmp / "check-out"
    archive.write_bytes(data)
    proc = subprocess.run(["7z", "x", "-y", f"-p{found.group(1)}", f"-o{dest}", str(archive)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    extracted = sorted(p.read_bytes() for p in dest.iterdir()) if dest.exists() else []
    shutil.rmtree(dest, ignore_errors=True)
    if proc.returncode != 0 or extracted != sorted(originals):
        raise BenchError(f"{relay.label}: 7z did not extract the original attachments from"
                         f" the delivered ZIP with the notice's password (exit"
                         f" {proc.returncode})")
    return (f"the copy holds {zips[0].get_filename()} ({len(data):,} bytes, application/zip)"
            f" and no PDF or CSV; the notice came from <> to the sender"
            f" (\"{notice['Subject']}\"); 7z extracted both attachments intact with its"
            " password")


def encrypt_events(log_text: str, files: int) -> tuple[int, list[str]]:
    """(messages the milter logged as zipped in place with `files` files, error lines)."""
    good = 0
    wanted = {"event": "attachments", "action": "encrypt", "delivered": "in place",
              "files": str(files)}
    for line in log_text.splitlines():
        fields = {k: v.strip('"') for k, v in LOG_FIELD.findall(line)}
        if all(fields.get(k) == v for k, v in wanted.items()):
            good += 1
    bad = [line for line in log_text.splitlines() if MILTER_LOG_BAD.search(line)]
    return good, bad


def milter_state(exc: BenchError, milter: MilterProcess) -> BenchError:
    """`exc` with whether the milter still runs (a crash shows as Postfix's "can't read
    SMFIC_... reply packet header" and then refusals) and its last log lines."""
    code = milter.proc.poll() if milter.proc is not None else None
    state = ("running" if code is None else f"EXITED with {code}"
             + (f" (signal {-code})" if code < 0 else ""))
    tail = "\n".join(milter.log_text().splitlines()[-5:])
    return BenchError(f"{exc}\nattachments milter {state}; log tail:\n{tail}")


@dataclass
class ThroughputResult:
    relays: list[Relay]
    rounds_done: int
    message_size: int
    sink_total: int
    expected: int
    checked: str
    encrypted: int  # messages the milter logged as zipped in place
    milter_problems: list[str]


def measure_throughput(settings: Settings, rig: Rig, relays: list[Relay],
                       check_sink: SmtpSink, message_file: Path, files: list[Attachment],
                       work: Path) -> tuple[str, int]:
    """Warm-up, the check, the timed rounds; returns the check's summary and the rounds."""
    for relay in relays:  # warm up: daemons forked, milter threads started, code paged in
        rig.send(relay, 5, 2, message_file)
    checked = check_encrypted(rig, relays[2], check_sink, message_file,
                              [data for _name, _ctype, data, _params in files], work)
    started = time.monotonic()
    rounds_done = 0
    for rnd in range(settings.milter_rounds):
        if rnd and time.monotonic() - started > settings.milter_budget:
            break
        for concurrency in CONCURRENCIES:
            shift = rnd % len(relays)  # rotate so no variant always runs first or last
            for relay in relays[shift:] + relays[:shift]:
                before = cpu_seconds(relay.pid) if relay.pid else 0.0
                relay.times.setdefault(concurrency, []).append(
                    rig.send(relay, settings.milter_messages, concurrency, message_file))
                if relay.pid:
                    relay.cpu[concurrency] = (relay.cpu.get(concurrency, 0.0)
                                              + cpu_seconds(relay.pid) - before)
                relay.timed[concurrency] = (relay.timed.get(concurrency, 0)
                                            + settings.milter_messages)
        rounds_done += 1
    return checked, rounds_done


def part3_throughput(settings: Settings, tmp: Path) -> ThroughputResult:
    work = tmp / "throughput"
    sockets = work / "sockets"
    sockets.mkdir(parents=True)
    os.chmod(sockets, 0o755)  # smtpd runs as user postfix and must reach the milter sockets
    files = typical_files()
    message_file = work / "typical.eml"
    message_file.write_bytes(build_mail("御見積書送付の件", files))
    null_sock, milter_sock = sockets / "null.sock", sockets / "attachments.sock"
    relays = [Relay("a", "Postfix, no milter"),
              Relay("b", "+ do-nothing pymilter, all steps (floor)", f"unix:{null_sock}"),
              Relay("c", "+ mailmoat attachments milter (encrypt)", f"unix:{milter_sock}",
                    per_message=2)]
    reinject_port = free_port()
    config = milter_config(work / "milter", reinject_port)
    rig = Rig(work / "smtp-sink.log")
    with contextlib.ExitStack() as stack:
        sink_port = stack.enter_context(smtp_sink(rig.sink_log))
        check_sink = stack.enter_context(SmtpSink())
        null = stack.enter_context(child_process(
            [sys.executable, str(Path(__file__).resolve().parent / "null_milter.py"),
             "--listen", f"unix:{null_sock}", "--steps", "all"], log=work / "null.log",
            env={**os.environ, "PYTHONPATH": str(ROOT)}))
        wait_until(lambda: null_sock.exists() or null.poll() is not None, 15, "null milter")
        if null.poll() is not None:
            raise BenchError(f"null milter exited: {(work / 'null.log').read_text()}")
        milter = stack.enter_context(MilterProcess("attachments", config, config.parent,
                                                   unix_path=milter_sock))
        assert milter.proc is not None
        relays[1].pid, relays[2].pid = null.pid, milter.proc.pid
        check_route = f"smtp:[{LOOPBACK}]:{check_sink.port}"
        for relay in relays:
            milter_side = relay.key == "c"
            relay.postfix = stack.enter_context(private_postfix(
                sink_port, relay.milters, work / f"pf-{relay.key}",
                reinject_port=reinject_port if milter_side else None,
                extra={"transport_maps": f"inline:{{{CHECK_RECIPIENT}={check_route},"
                                         f" {CHECK_SENDER}={check_route}}}"}
                if milter_side else None))

        try:
            checked, rounds_done = measure_throughput(settings, rig, relays, check_sink,
                                                      message_file, files, work)
        except BenchError as exc:
            raise milter_state(exc, milter) from None
        encrypted, problems = encrypt_events(milter.log_text(), len(files))
        return ThroughputResult(relays, rounds_done, message_file.stat().st_size,
                                sink_messages(rig.sink_log), rig.expected, checked, encrypted,
                                problems)


def print_part3_throughput(settings: Settings, result: ThroughputResult) -> None:
    """Print the table and the checks; BenchError if the milter's log disagrees."""
    n = settings.milter_messages
    by_key = {r.key: r for r in result.relays}
    print(f"Part 3a: messages/s through a private Postfix to smtp-sink (smtp-source -F, one"
          f" {result.message_size:,}-byte mail: ISO-2022-JP text, a"
          f" {TYPICAL_SIZES[0]:,}-byte PDF-like file of random bytes and a"
          f" {TYPICAL_SIZES[1] / 1e6:.1f} MB Shift_JIS CSV, both base64; -m {n}, one session"
          f" per message, wall time until all accepted; median of {result.rounds_done} rounds,"
          " variants alternated; ratios are the median of per-round ratios)")
    headers = ["variant"]
    for c in CONCURRENCIES:
        headers += [f"c={c} msgs/s", f"c={c} min..max", f"c={c} milter CPU ms/msg"]
    body = []
    for r in result.relays:
        row = [f"({r.key}) {r.label}"]
        for c in CONCURRENCIES:
            times = r.times[c]
            row += [f"{n / median(times):.1f}",
                    f"{n / max(times):.1f}..{n / min(times):.1f}",
                    f"{r.cpu[c] / r.timed[c] * 1e3:.1f}" if r.pid else ""]
        body.append(row)
    for num, den, what in (("c", "b", "the milter against the do-nothing floor"),
                           ("c", "a", "the milter against no milter"),
                           ("b", "a", "a do-nothing pymilter's own cost")):
        row = [f"ratio ({num})/({den}) msgs/s, {what}"]
        for c in CONCURRENCIES:
            # Paired within each round (seconds apart, under the same load from other
            # tenants), then the median over rounds: steadier than a ratio of medians.
            pairs = [t_den / t_num for t_num, t_den in zip(by_key[num].times[c],
                                                           by_key[den].times[c])]
            row += [f"{median(pairs):.3f}", f"{min(pairs):.2f}..{max(pairs):.2f}", ""]
        body.append(row)
    print(table(headers, body))
    c_side = by_key["c"]
    fastest = max(CONCURRENCIES, key=lambda c: n / median(c_side.times[c]))
    print(f"  no target for throughput (reported only); (c) at c={fastest} carries"
          f" {n / median(c_side.times[fastest]) * result.message_size / 1e6:.1f} MB/s of mail."
          f"\n  milter CPU ms/msg: user+system CPU of the milter process (/proc/PID/stat, all"
          " threads) over the timed runs, per message sent: (b) the null milter, (c) the"
          " attachments milter (parse, ZIP, rebuild, body replacement, the notice sent back"
          " over SMTP)")
    print(f"  correctness, before timing (one message through (c) to a second sink):"
          f" {result.checked}")
    print(f"  checks: smtp-source saw no refusal or tempfail; after every run each maillog"
          f" showed every delivery status=sent and no reject, deferral or milter warning,"
          f" and smtp-sink's count matched: {result.sink_total} in all = "
          + " + ".join(f"{r.sent} x {r.per_message} ({r.key})" for r in result.relays)
          + " (each message through (c) arrives as its zipped copy plus the password notice;"
            " the check message went to the second sink)")
    if result.sink_total != result.expected:
        raise BenchError(f"smtp-sink counted {result.sink_total}, expected {result.expected}")
    print(f"  attachments milter log: {result.encrypted} messages zipped in place"
          f" (event=attachments action=encrypt files=2); {c_side.sent + c_side.checked} went"
          " through (c)")
    if result.encrypted != c_side.sent + c_side.checked or result.milter_problems:
        raise BenchError("the attachments milter's log disagrees: "
                         + "\n".join(result.milter_problems[:10]))


@dataclass(frozen=True)
class MilterPeak:
    wire: int  # bytes of the message file smtp-source sent (LF line ends)
    delivered: int  # bytes of the zipped copy as Postfix queued it (qmgr size=)
    start_rss: int  # VmRSS after a warm-up message
    start_hwm: int
    peak: int  # VmHWM after the big message
    after_rss: int
    cpu: float  # milter CPU seconds for the big message
    wall: float  # smtp-source's wall time for it


def proc_status(pid: int, name: str) -> int:
    """A /proc/PID/status figure in kB (VmRSS, VmHWM), as bytes."""
    found = re.search(rf"^{name}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    if not found:
        raise BenchError(f"no {name} in /proc/{pid}/status")
    return int(found.group(1)) * 1024


def part3_memory(tmp: Path) -> MilterPeak:
    """A fresh attachments milter behind its own Postfix: one mail without attachments as a
    warm-up (parsing and policy code paged in; the milter lets it through as it is), then
    one mail with a BIG-byte attachment."""
    work = tmp / "memory"
    sockets = work / "sockets"
    sockets.mkdir(parents=True)
    os.chmod(sockets, 0o755)
    small, big = work / "small.eml", work / "big.eml"
    small.write_bytes(build_mail("ご連絡", []))
    big.write_bytes(build_mail("資料送付（大容量）", [
        ("データ.bin", "application/octet-stream", os.urandom(BIG), {})]))
    sock = sockets / "attachments.sock"
    relay = Relay("m", "attachments milter, 20 MiB attachment", f"unix:{sock}", per_message=2)
    reinject_port = free_port()
    config = milter_config(work / "milter", reinject_port)
    rig = Rig(work / "smtp-sink.log")
    with contextlib.ExitStack() as stack:
        sink_port = stack.enter_context(smtp_sink(rig.sink_log))
        milter = stack.enter_context(MilterProcess("attachments", config, config.parent,
                                                   unix_path=sock))
        assert milter.proc is not None
        pid = milter.proc.pid
        relay.postfix = stack.enter_context(private_postfix(
            sink_port, relay.milters, work / "pf", reinject_port=reinject_port))
        try:
            rig.send(relay, 1, 1, small, per_message=1)  # nothing to zip: no notice
            start_rss, start_hwm = proc_status(pid, "VmRSS"), proc_status(pid, "VmHWM")
            before = cpu_seconds(pid)
            wall = rig.send(relay, 1, 1, big)
            peak, after = proc_status(pid, "VmHWM"), proc_status(pid, "VmRSS")
            cpu = cpu_seconds(pid) - before
        except BenchError as exc:
            raise milter_state(exc, milter) from None
        # The copy kept in place (from the sender; the notice comes from <>): the ZIP with
        # the attachment's bytes in it, base64, so larger than the attachment.
        sizes = [int(s) for s in re.findall(rf"from=<{re.escape(SENDER)}>, size=(\d+)",
                                            rig.last_log)]
        if len(sizes) != 1 or sizes[0] < BIG:
            raise BenchError(f"the zipped copy as Postfix queued it: sizes {sizes}, expected"
                             f" one above {BIG:,} bytes")
        encrypted, problems = encrypt_events(milter.log_text(), 1)
        if encrypted != 1 or problems:
            raise BenchError(f"the attachments milter logged {encrypted} zipped messages, not"
                             " 1:\n"
                             + "\n".join(problems[:10]))
    return MilterPeak(big.stat().st_size, sizes[0], start_rss, start_hwm, peak, after, cpu,
                      wall)


def print_part3_memory(result: MilterPeak) -> None:
    mib = 2**20
    print(f"Part 3b: peak RSS (VmHWM) of a fresh attachments milter process while one mail with"
          f" a single {BIG:,}-byte attachment of random bytes ({result.wire:,} bytes as sent,"
          f" {result.delivered:,} as delivered with the ZIP) goes through it, Postfix in front")
    growth = result.peak - result.start_hwm
    print(table(["start MiB", "peak MiB", "after MiB", "peak / attachment (<= 3x)",
                 "growth / attachment", "milter CPU s", "wall s"],
                [[f"{result.start_rss / mib:.1f}", f"{result.peak / mib:.1f}",
                  f"{result.after_rss / mib:.1f}",
                  f"{result.peak / BIG:.2f}x {verdict(result.peak <= 3 * BIG)}",
                  f"{growth / BIG:.2f}x", f"{result.cpu:.2f}", f"{result.wall:.2f}"]],
                right=[True] * 7))
    print("  start: VmRSS after a warm-up mail without attachments (VmHWM then"
          f" {result.start_hwm / mib:.1f} MiB); peak: VmHWM once the big mail was delivered"
          " (zipped copy and notice at the sink); after: VmRSS then; growth = peak - start"
          " VmHWM; wall: smtp-source until Postfix accepted the mail")


def run_part3(settings: Settings, tmp: Path) -> list[str]:
    """Parts 3a and 3b, each with its own Postfix and milter, so that one failing does not
    keep the other from running; returns the names of those that could not run."""
    failed = []
    steps = (("3a", lambda: print_part3_throughput(settings, part3_throughput(settings, tmp))),
             ("3b", lambda: print_part3_memory(part3_memory(tmp))))
    for name, step in steps:
        print()
        try:
            step()
        except (BenchError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
            failed.append(name)
            print(f"Part {name} could not run: {exc}")
    return failed


# == main ==================================================================================
def preflight(settings: Settings) -> None:
    missing = [] if shutil.which("7z") else ["7z (Debian package p7zip-full)"]
    if settings.milter:
        missing += [p for p in (SMTP_SOURCE, SMTP_SINK, POSTFIX) if not os.access(p, os.X_OK)]
    if missing:
        raise BenchError("missing: " + ", ".join(missing)
                         + (" (--skip-milter runs Parts 1-2 only)" if settings.milter else ""))
    if settings.milter and os.geteuid() != 0:
        raise BenchError("Part 3 starts private Postfix instances, which needs root"
                         " (--skip-milter runs Parts 1-2 only)")


def describe_machine(settings: Settings) -> str:
    banner = subprocess.run(["7z"], capture_output=True, text=True, timeout=30).stdout
    versions = re.findall(r"(?:7-Zip \[64\]|p7zip Version) ([\d.]+)", banner)
    libarchive = ffi.version_number()
    tools = [f"libarchive {libarchive // 1000000}.{libarchive // 1000 % 1000}."
             f"{libarchive % 1000}", f"zlib {zlib.ZLIB_RUNTIME_VERSION}",
             f"7z {' / p7zip '.join(versions) or '?'}"]
    if settings.milter:
        tools.append(f"Postfix {postfix_version()}")
    return machine_line(*tools)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds instead of 9; Part 3a: 10 messages per run, 3 rounds")
    parser.add_argument("--skip-milter", action="store_true",
                        help="leave out Part 3 (the milter behind Postfix; needs root)")
    args = parser.parse_args(argv)
    settings = Settings.make(args.quick, milter=not args.skip_milter)
    def body() -> int:
        with world_readable_tmpdir("mailmoat-bench-zip-") as tmp:
            print_part1(settings, *part1(settings, tmp))
            print()
            print_part2(part2(tmp))
            failed = run_part3(settings, tmp) if settings.milter else []
        if failed:
            print(f"bench/zip.py: Part {' and '.join(failed)} could not run", file=sys.stderr)
        return 1 if failed else 0
    return run_bench("zip.py", "".join(f" --{f}" for f, on in (("quick", args.quick), ("skip-milter", args.skip_milter)) if on), lambda: preflight(settings), lambda: describe_machine(settings), body)


if __name__ == "__main__":
    sys.exit(main())
