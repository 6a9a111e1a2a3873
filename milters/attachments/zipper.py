"""One password-protected ZIP for all attachments of a mail, written by libarchive.

ZipCrypto by default, because Windows Explorer opens nothing else; AES-256 on request.
Entry names go out in CP932 without the UTF-8 flag (general purpose bit 11) for Japanese
Explorer, or in UTF-8 with it. libarchive sets bit 11 itself with hdrcharset=UTF-8 (for
non-ASCII names; ASCII is the same in both) and never with hdrcharset=CP932.

libarchive converts names from the calling thread's LC_CTYPE charset with iconv; under
LC_ALL=C it writes the unconverted UTF-8 bytes into a "CP932" ZIP without even a warning.
write_zip therefore switches its own thread to a UTF-8 LC_CTYPE while it writes
(uselocale: other threads keep theirs). glibc's CP932 table is Windows' own: 髙 becomes the
IBM extension 0xFBFC, where Python's cp932 codec picks the NEC-selected 0xEEE0 (Windows
reads both).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import locale
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import libarchive
from libarchive import ffi
from libarchive.exception import ArchiveError

from milters.core.errors import MailmoatError

from milters.core.mime.names import encodable

ENCRYPTIONS = {"zipcrypto": "zipcrypt", "aes256": "aes256"}  # ours -> libarchive's
CHARSETS = {"cp932": "CP932", "utf-8": "UTF-8"}
# libarchive hands the output over in blocks of this size: one Python call per block.
BLOCK_SIZE = 64 * 1024
# Most attachments (JPEG, PNG, PDF streams, docx/xlsx, which are ZIPs) do not shrink, and
# deflating them costs more than encrypting and writing together: an entry whose samples
# save under 3 % is stored. 7-Zip stores such files too, but only after deflating them.
SAMPLES, SAMPLE_SIZE, WORTH_IT = 8, 32 * 1024, 0.97


class ZipError(MailmoatError):
    """The ZIP could not be written (libarchive failed, or writing the output did)."""


@dataclass(frozen=True)
class ZipEntry:
    name: str  # final, from names.entry_names: write_zip does not clean it
    # bytes, or a file (a decoded attachment spooled to disk) read in BLOCK_SIZE pieces from
    # its start: a large attachment is never held in memory whole
    data: bytes | BinaryIO
    mtime: float = field(default_factory=time.time)


@functools.cache
def _utf8_switch() -> tuple[Callable[[int | None], int | None], int] | None:
    """libc's uselocale and a locale_t with a UTF-8 LC_CTYPE, made once; None where that
    cannot be had."""
    if not sys.platform.startswith("linux"):  # LC_CTYPE_MASK below is glibc's and musl's
        return None
    libc = ctypes.CDLL(None)
    libc.newlocale.restype = ctypes.c_void_p
    libc.newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
    libc.uselocale.restype = ctypes.c_void_p
    libc.uselocale.argtypes = [ctypes.c_void_p]
    for name in (b"C.UTF-8", b"C.utf8", b"en_US.UTF-8"):
        handle = libc.newlocale(1 << locale.LC_CTYPE, name, None)
        if handle:  # kept for the life of the process
            return libc.uselocale, int(handle)
    return None


def _is_utf8(codeset: str) -> bool:
    return codeset.upper().replace("-", "") == "UTF8"


@contextlib.contextmanager
def _utf8_ctype() -> Iterator[None]:
    """Run the block with a UTF-8 LC_CTYPE in this thread (nothing to do if it has one)."""
    codeset = locale.nl_langinfo(locale.CODESET)
    if _is_utf8(codeset):
        yield
        return
    switch = _utf8_switch()
    if switch is None:
        raise ZipError(f"ZIP entry names need a UTF-8 LC_CTYPE; this one is {codeset} and no"
                       " UTF-8 locale could be loaded")
    uselocale, handle = switch
    previous = uselocale(handle)
    try:
        yield
    finally:
        uselocale(previous)


def _options(encryption: str, charset: str, level: int) -> str:
    if encryption not in ENCRYPTIONS:
        raise ValueError(f"unknown encryption {encryption!r}; use one of"
                         f" {', '.join(ENCRYPTIONS)}")
    if charset not in CHARSETS:
        raise ValueError(f"unknown charset {charset!r}; use one of {', '.join(CHARSETS)}")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise ValueError(f"compression level must be 0 (store) to 9, not {level!r}")
    return (f"zip:encryption={ENCRYPTIONS[encryption]},zip:hdrcharset={CHARSETS[charset]},"
            f"zip:compression-level={level}")


def _size(data: bytes | BinaryIO) -> int:
    if isinstance(data, bytes):
        return len(data)
    size = data.seek(0, 2)
    data.seek(0)
    return size


def _sample(data: bytes | BinaryIO, at: int) -> bytes:
    if isinstance(data, bytes):
        return data[at:at + SAMPLE_SIZE]
    data.seek(at)
    sample = data.read(SAMPLE_SIZE)
    data.seek(0)
    return sample


def _pieces(data: bytes | BinaryIO) -> Iterable[bytes]:
    if isinstance(data, bytes):
        return (data,)
    data.seek(0)
    return iter(lambda: data.read(BLOCK_SIZE), b"")


def _worth_deflating(data: bytes | BinaryIO) -> bool:
    """Whether deflate shrinks `data`, judged from evenly spaced samples (all of a small one)."""
    size = _size(data)
    if size <= SAMPLES * SAMPLE_SIZE:
        return True  # cheap enough to deflate whatever it is
    step = (size - SAMPLE_SIZE) // (SAMPLES - 1)
    samples = [_sample(data, i * step) for i in range(SAMPLES)]
    packed = sum(len(zlib.compress(sample, 1)) for sample in samples)
    return packed < WORTH_IT * SAMPLES * SAMPLE_SIZE


@functools.cache
def _compression_switches() -> tuple[Callable[[int], int], Callable[[int], int]]:
    """libarchive's per-entry store/deflate switches, which libarchive-c does not wrap
    (zip options can only be set before the first entry)."""
    switches = []
    for name in ("store", "deflate"):
        func = getattr(ffi.libarchive, f"archive_write_zip_set_compression_{name}")
        func.argtypes, func.restype = [ctypes.c_void_p], ctypes.c_int
        switches.append(func)
    return switches[0], switches[1]


def _check_password(password: str) -> None:
    # Other tools turn non-ASCII passwords into different bytes (Explorer: the ANSI code
    # page, 7-Zip: UTF-8 for AES), so the recipient could not open the ZIP.
    if not password or not (password.isascii() and password.isprintable()):
        raise ValueError("the ZIP password must be non-empty printable ASCII")


def write_zip(out: BinaryIO, entries: Iterable[ZipEntry], *, password: str,
              encryption: str = "zipcrypto", charset: str = "cp932", level: int = 6) -> int:
    """Write one encrypted ZIP of `entries` to `out`; return the number of bytes written.

    encryption: "zipcrypto" or "aes256"; charset of the entry names: "cp932" (no UTF-8
    flag) or "utf-8" (flag set); level: deflate level, 0 stores (so is an entry whose
    samples do not shrink). Each entry's data goes to libarchive as it is (no copy); the
    ZIP comes back in BLOCK_SIZE pieces for `out`.
    """
    options = _options(encryption, charset, level)
    _check_password(password)
    written = 0
    failed: list[BaseException] = []

    def sink(block: ctypes.Array[ctypes.c_char]) -> int:
        nonlocal written
        try:
            out.write(block)
        except BaseException as exc:  # noqa: BLE001 -- a ctypes callback must not raise
            failed.append(exc)
            return -1  # libarchive gives up and reports a fatal error
        written += len(block)
        return len(block)

    try:
        with _utf8_ctype(), libarchive.custom_writer(
                sink, "zip", options=options, passphrase=password,
                block_size=BLOCK_SIZE) as archive:
            for entry in entries:
                if not entry.name or not encodable(entry.name, charset):
                    raise ValueError(f"ZIP entry name {entry.name!r} is not {charset}: use"
                                     " names.entry_names")
                if level:
                    store, deflate = _compression_switches()
                    switch = deflate if _worth_deflating(entry.data) else store
                    if switch(archive._pointer) != 0:  # noqa: SLF001 -- not wrapped
                        raise ZipError("libarchive refused to switch the compression method")
                archive.add_file_from_memory(entry.name, _size(entry.data),
                                             _pieces(entry.data), permission=0o644,
                                             mtime=entry.mtime)
    except ArchiveError as exc:
        if failed:
            if not isinstance(failed[0], Exception):  # KeyboardInterrupt and the like
                raise failed[0] from None
            raise ZipError(f"writing the ZIP failed: {failed[0]}") from failed[0]
        raise ZipError(f"libarchive could not write the ZIP: {exc.msg}") from exc
    return written
