"""Is this file locked with a password? (The PPAP pattern: a password ZIP now, the password
in a second mail, and no scanner on the way can look inside.)

Runs inside the sandboxed worker: every check parses hostile bytes. ZIPs are read from their
central directory (no decompression) and nested archives are opened up to a depth and a
decompressed-size budget; 7z and RAR are listed by the 7z program; Office files by their
OLE encryption streams (msoffcrypto-tool) or ODF manifest; PDFs by pdfium.
"""
from __future__ import annotations

import io
import re
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
SEVENZ_MAGIC = b"7z\xbc\xaf\x27\x1c"
RAR_MAGIC = b"Rar!\x1a\x07"


class OverLimit(Exception):
    """Looking further would pass a limit (depth, bytes): the file cannot be cleared."""


@dataclass
class Budget:
    depth: int
    bytes_left: int
    seven_zip: str = "7z"
    scratch: Path = Path(".")


def locked(data_or_path: bytes | Path, budget: Budget, depth: int = 0) -> str | None:
    """Why the file is locked ("an encrypted ZIP entry 'a.docx'"), or None."""
    head = _head(data_or_path)
    if head.startswith(ZIP_MAGIC):
        return _zip(data_or_path, budget, depth)
    if head.startswith(OLE_MAGIC):
        return _ole(data_or_path)
    if head.startswith(b"%PDF-") or b"%PDF-" in head[:1024]:
        return _pdf(data_or_path)
    if head.startswith((SEVENZ_MAGIC, RAR_MAGIC)):
        return _listed(data_or_path, budget)
    return None


def _head(data_or_path: bytes | Path) -> bytes:
    if isinstance(data_or_path, bytes):
        return data_or_path[:1024]
    with open(data_or_path, "rb") as f:
        return f.read(1024)


def _open(data_or_path: bytes | Path) -> io.BufferedIOBase | io.BytesIO:
    return io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) \
        else open(data_or_path, "rb")


def _zip(data_or_path: bytes | Path, budget: Budget, depth: int) -> str | None:
    try:
        with _open(data_or_path) as f, zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            for info in infos:
                if info.flag_bits & 0x1:
                    return f"an encrypted ZIP entry '{info.filename[:100]}'"
            if "META-INF/manifest.xml" in archive.namelist():
                manifest = archive.read("META-INF/manifest.xml")[:1_000_000]
                if b"encryption-data" in manifest:
                    return "a password-protected OpenDocument file"
            return _nested(archive, infos, budget, depth)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            NotImplementedError):
        return None  # a broken archive: nothing in it can be opened, with a password or not


def _nested(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], budget: Budget,
            depth: int) -> str | None:
    """Archives and documents inside the ZIP, each read whole within the budget."""
    for info in infos:
        if info.is_dir() or info.file_size == 0:
            continue
        with archive.open(info) as member:
            head = member.read(8)
        if not head.startswith(ZIP_MAGIC + (OLE_MAGIC, SEVENZ_MAGIC, RAR_MAGIC, b"%PDF-")):
            continue
        if depth + 1 > budget.depth:
            raise OverLimit(f"archives nested deeper than {budget.depth}")
        if info.file_size > budget.bytes_left:
            raise OverLimit("nested archives larger than the decompression limit")
        data = _read_bounded(archive, info, budget)
        found = locked(data, budget, depth + 1)
        if found:
            return f"{found} inside '{info.filename[:100]}'"
    return None


def _read_bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget) -> bytes:
    """The member's bytes, never more than the budget whatever its header claims."""
    chunks, total = [], 0
    with archive.open(info) as member:
        while chunk := member.read(1024 * 1024):
            total += len(chunk)
            if total > budget.bytes_left:
                raise OverLimit("nested archives larger than the decompression limit")
            chunks.append(chunk)
    budget.bytes_left -= total
    return b"".join(chunks)


def _ole(data_or_path: bytes | Path) -> str | None:
    import msoffcrypto  # loaded where used
    from msoffcrypto.exceptions import FileFormatError
    try:
        with _open(data_or_path) as f:
            if msoffcrypto.OfficeFile(f).is_encrypted():
                return "a password-protected Office document"
    except (FileFormatError, OSError, ValueError, AssertionError, IndexError, KeyError,
            TypeError) as exc:
        del exc  # not an Office file msoffcrypto knows: not one a password locks either
    return None


def _pdf(data_or_path: bytes | Path) -> str | None:
    import pypdfium2 as pdfium
    try:
        source = data_or_path if isinstance(data_or_path, bytes) else str(data_or_path)
        pdfium.PdfDocument(source).close()
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) == 4 or "password" in str(exc).lower():
            return "a password-protected PDF"
    return None


_ENCRYPTED_ENTRY = re.compile(r"^Encrypted = \+", re.MULTILINE)


def _listed(data_or_path: bytes | Path, budget: Budget) -> str | None:
    """7z and RAR: the 7z program lists them (headers only); a wrong dummy password makes
    it report encrypted entries, or fail on encrypted headers."""
    path = data_or_path
    if isinstance(data_or_path, bytes):
        path = budget.scratch / "nested.bin"
        path.write_bytes(data_or_path)
    kind = "7z" if _head(path).startswith(SEVENZ_MAGIC) else "RAR"
    try:
        done = subprocess.run([budget.seven_zip, "l", "-slt", "-pmailmoat-probe", "--",
                               str(path)], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        raise OverLimit(f"could not list the {kind} archive") from None
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    if _ENCRYPTED_ENTRY.search(text):
        return f"an encrypted {kind} archive"
    if "Wrong password" in text or "encrypted archive" in text.lower():
        return f"a {kind} archive with encrypted file names"
    return None
