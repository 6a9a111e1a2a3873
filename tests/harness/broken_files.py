"""Files no converter can read, as real mail carries them: a picture cut off in transfer,
a "PDF" that is garbage after its header, a Word document whose parts are not XML."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

from tests.harness import documents as docs


def truncated_png(path: Path) -> Path:
    """A real PNG cut in the middle of its pixel data: the header is fine, the rest gone."""
    whole = docs.png(path.with_suffix(".whole.png"), 300, 200).read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    return path


def garbage_pdf(path: Path) -> Path:
    path.write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(range(256)) * 40 + b"\n%%EOF\n")
    return path


def corrupt_docx(path: Path) -> Path:
    """A ZIP that looks like a Word document (content types, document part) but whose
    parts are not XML: LibreOffice cannot load it."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types not xml")
        archive.writestr("_rels/.rels", "\x00\x01 not xml")
        archive.writestr("word/document.xml", "\x00\x01garbage<w:document")
    path.write_bytes(out.getvalue())
    return path
