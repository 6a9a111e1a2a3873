"""A PDF made only of page images, written one page at a time (PDF 1.7, ISO 32000-1).

Pillow's multi-page PDF save holds every page in memory (bench/neutralize.py shows it);
here each page's image goes to the file as soon as it is encoded, so memory stays at one
page whatever the page count. The file has nothing but images: no fonts, text, links,
annotations, scripts, forms or attachments. Pages are JPEG (DCTDecode, stored as encoded)
or lossless (FlateDecode of the raw RGB samples).
"""
from __future__ import annotations

from typing import BinaryIO


class ImagePdfWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.offsets: dict[int, int] = {}
        self.pages: list[int] = []
        self.next_id = 3  # 1 is the catalog, 2 the page tree (written at the end)
        self._write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")

    def _write(self, data: bytes) -> None:
        self.out.write(data)

    def _object(self, number: int, body: bytes, stream: bytes | None = None) -> None:
        self.offsets[number] = self.out.tell()
        self._write(b"%d 0 obj\n" % number + body)
        if stream is not None:
            self._write(b"\nstream\n" + stream + b"\nendstream")
        self._write(b"\nendobj\n")

    def _ids(self, count: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + count))
        self.next_id += count
        return ids

    def add_jpeg(self, jpeg: bytes, width: int, height: int,
                 points: tuple[float, float]) -> None:
        """An RGB JPEG, stored as it was encoded."""
        self._add_image(jpeg, b"/DCTDecode", width, height, points)

    def add_deflated(self, deflated: bytes, width: int, height: int,
                     points: tuple[float, float]) -> None:
        """8-bit RGB samples the caller deflated (zlib format, as FlateDecode wants)."""
        self._add_image(deflated, b"/FlateDecode", width, height, points)

    def _add_image(self, data: bytes, codec: bytes, width: int, height: int,
                   points: tuple[float, float]) -> None:
        image, content, page = self._ids(3)
        self._object(image, b"<< /Type /XObject /Subtype /Image /Width %d /Height %d "
                            b"/ColorSpace /DeviceRGB /BitsPerComponent 8 /Filter %s "
                            b"/Length %d >>" % (width, height, codec, len(data)), data)
        w, h = (b"%.2f" % points[0]), (b"%.2f" % points[1])
        drawing = b"q " + w + b" 0 0 " + h + b" 0 0 cm /Im0 Do Q"
        self._object(content, b"<< /Length %d >>" % len(drawing), drawing)
        self._object(page, b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 " + w + b" " + h
                     + b"] /Resources << /XObject << /Im0 %d 0 R >> >> /Contents %d 0 R >>"
                     % (image, content))
        self.pages.append(page)

    def close(self) -> None:
        kids = b" ".join(b"%d 0 R" % page for page in self.pages)
        self._object(1, b"<< /Type /Catalog /Pages 2 0 R >>")
        self._object(2, b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % len(self.pages))
        xref_at = self.out.tell()
        size = self.next_id
        lines = [b"xref\n0 %d\n" % size, b"0000000000 65535 f \n"]
        for number in range(1, size):
            lines.append(b"%010d 00000 n \n" % self.offsets[number])
        self._write(b"".join(lines))
        self._write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
                    % (size, xref_at))
