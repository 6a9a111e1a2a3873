"""How fast the attachments milter writes its encrypted ZIP, against 7-Zip, and its memory.

    .venv/bin/python bench/zip.py [--quick]

Part 1: MB/s of write_zip (ZipCrypto and AES-256) on a 10 MiB incompressible file and a
10 MiB text file, against `7z a -tzip -mx=1` with the same encryption on the same files,
alternated over rounds. Part 2: peak RSS of a fresh process zipping one 20 MiB attachment.

Everything lives in one temporary directory, removed at the end (also on Ctrl-C/SIGTERM);
every 7z run has a time limit. Exit status 0 unless something could not run or a check
failed (missed targets are reported, not failures). See bench/README.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from _common import (ROOT, BenchError, Interrupted, exit_cleanly_on_sigterm, median, table,
                     verdict, world_readable_tmpdir)

from libarchive import ffi  # noqa: E402  (after _common put the project on sys.path)

from milters.attachments import zipper  # noqa: E402
from milters.attachments.zipper import ZipEntry, write_zip  # noqa: E402

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

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        return cls(quick, rounds=3 if quick else 9)


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


# == main ==================================================================================
def describe_machine() -> str:
    banner = subprocess.run(["7z"], capture_output=True, text=True, timeout=30).stdout
    versions = re.findall(r"(?:7-Zip \[64\]|p7zip Version) ([\d.]+)", banner)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    libarchive = ffi.version_number()
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {os.cpu_count()} CPUs, load"
            f" {load}; Python {platform.python_version()}, libarchive"
            f" {libarchive // 1000000}.{libarchive // 1000 % 1000}.{libarchive % 1000},"
            f" zlib {zlib.ZLIB_RUNTIME_VERSION}, 7z {' / p7zip '.join(versions) or '?'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 9")
    args = parser.parse_args(argv)
    settings = Settings.make(args.quick)
    exit_cleanly_on_sigterm()
    try:
        if shutil.which("7z") is None:
            raise BenchError("missing: 7z (Debian package p7zip-full)")
        print(f"bench/zip.py{' --quick' if args.quick else ''}: {describe_machine()}")
        print("Shared machine: absolute numbers are noisy; compare ratios within one run.\n")
        with world_readable_tmpdir("mailmoat-bench-zip-") as tmp:
            print_part1(settings, *part1(settings, tmp))
            print()
            print_part2(part2(tmp))
        return 0
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"bench/zip.py: {exc or 'interrupted'}; its files are removed", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        traceback.print_exc()
        print(f"bench/zip.py: could not run: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
