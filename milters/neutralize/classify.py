"""What kind of file an attachment is, and what the policy's table says to do with it.

The first bytes decide where they can: a sender names and labels files as they like, so an
executable called invoice.pdf is "other", not "pdf". The name and the declared type decide
only what the bytes cannot tell apart (a ZIP is an archive unless it is an Office or ODF
document; plain text has no signature).
"""
from __future__ import annotations

import zipfile
from typing import BinaryIO

from milters.core.mime.names import split_ext

from .encrypted import OLE_MAGIC, RAR_MAGIC, SEVENZ_MAGIC, ZIP_MAGIC
from .settings import Conversion

OFFICE_EXTS = frozenset({
    ".doc", ".docx", ".docm", ".dot", ".dotx", ".dotm", ".rtf", ".xls", ".xlsx", ".xlsm",
    ".xlsb", ".xlt", ".xltx", ".xltm", ".csv", ".ppt", ".pptx", ".pptm", ".pot", ".potx",
    ".pps", ".ppsx", ".odt", ".ods", ".odp", ".odg", ".ott", ".ots", ".otp",
})
ARCHIVE_EXTS = frozenset({".zip", ".7z", ".rar", ".lzh", ".lha", ".cab", ".tar", ".gz",
                          ".tgz", ".bz2", ".xz", ".zst", ".iso", ".img", ".arj", ".ace"})
TEXT_EXTS = frozenset({".txt", ".log", ".text"})
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
                b"II*\x00", b"MM\x00*")
_OTHER_ARCHIVES = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"MSCF", b"\x28\xb5\x2f\xfd")


def kind_of(head: bytes, filename: str, content_type: str, data: BinaryIO | None = None) -> str:
    """office | pdf | image | archive | text | other. `head` is the first KiB; `data` (the
    whole file), when given for a ZIP, lets its central directory tell documents from
    archives."""
    ext = split_ext(filename.lower())[1]
    if head.startswith(b"%PDF-") or b"%PDF-" in head[:1024]:
        return "pdf"
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head.startswith(OLE_MAGIC):
        return "office"  # Word/Excel/PowerPoint 97-2003, or an encrypted OOXML file
    if head.startswith(ZIP_MAGIC):
        return "office" if _zip_is_document(data) else "archive"
    if head.startswith((SEVENZ_MAGIC, RAR_MAGIC) + _OTHER_ARCHIVES) or ext in ARCHIVE_EXTS:
        return "archive"
    if head.startswith(b"{\\rtf"):
        return "office"
    if b"\x00" in head:
        return "other"  # binary without a signature we know: an executable, say
    if ext in TEXT_EXTS or (content_type == "text/plain" and ext in ("", ".csv")):
        return "text"
    if ext == ".csv":
        return "office"
    return "other"


def _zip_is_document(data: BinaryIO | None) -> bool:
    if data is None:
        return False
    try:
        data.seek(0)
        with zipfile.ZipFile(data) as archive:
            names = set(archive.namelist()[:10_000])
        data.seek(0)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    return "[Content_Types].xml" in names or "mimetype" in names


def conversion_for(kind: str, filename: str, content_type: str,
                   table: tuple[Conversion, ...]) -> str:
    """The first row of the table that matches; drop when none does."""
    ext = split_ext(filename.lower())[1]
    major = content_type.split("/", 1)[0] + "/*"
    for row in table:
        for match in row.match:
            if match in ("*", kind, content_type, major) or (match.startswith(".")
                                                              and match == ext):
                return row.action
    return "drop"
