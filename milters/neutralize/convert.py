"""The conversions themselves, run inside the sandboxed worker (worker.py), never in the
milter: documents to PDF by LibreOffice, PDF pages to pixels by pdfium and back into an
image-only PDF one page at a time, pictures decoded and re-encoded by Pillow without their
metadata.
"""
from __future__ import annotations

import io
import math
import os
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path


# page_format auto keeps a page lossless when deflate brings it to this share of its size.
AUTO_LOSSLESS = 0.15


class ConversionFailed(Exception):
    """The file cannot be made safe (over a limit, or the converter failed): the policy's
    on_failure, since another try may succeed."""


class Unreadable(ConversionFailed):
    """The converter read the file and says it is not what it claims to be (not a PDF
    pdfium can open, a picture Pillow cannot decode, a document LibreOffice cannot load):
    permanent, no retry can help (the policy's on_unreadable). Raised only where the
    converter itself names the input as the problem; a crash or a limit never is this."""


# pdfium's FPDF_ERR_FORMAT: "file not in PDF format or corrupted" (the others are a missing
# file, a password, a security handler, a page, or unknown: not a statement about the data).
_PDFIUM_FORMAT_ERROR = 3
# What soffice --convert-to prints (and exits 0) for a file none of its filters can load.
_CANNOT_LOAD = "source file could not be loaded"


@dataclass(frozen=True)
class Options:
    dpi: int = 100
    page_format: str = "auto"
    jpeg_quality: int = 85
    image_format: str = "png"
    pages: int = 50
    page_pixels: int = 4_000_000
    image_pixels: int = 40_000_000
    soffice: str = "soffice"
    wall: float = 120.0


def flatten_pdf(source: Path, target: Path, options: Options) -> int:
    """Every page rendered and written as an image into a new PDF; the page count."""
    import pypdfium2 as pdfium

    from .pdfwriter import ImagePdfWriter
    try:
        document = pdfium.PdfDocument(str(source))
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) == _PDFIUM_FORMAT_ERROR:
            raise Unreadable(f"not a PDF pdfium can open ({exc})") from None
        raise ConversionFailed(f"pdfium could not open it ({exc})") from None
    try:
        count = len(document)
        if count > options.pages:
            raise ConversionFailed(f"{count} pages; the limit is {options.pages}")
        if count == 0:
            raise Unreadable("a PDF without pages")
        with open(target, "wb") as out:
            writer = ImagePdfWriter(out)
            for index in range(count):
                _render_page(document[index], writer, options)
            writer.close()
        return count
    finally:
        document.close()


def _render_page(page, writer, options: Options) -> None:  # type: ignore[no-untyped-def]
    width, height = page.get_size()  # points, 1/72 inch
    scale = options.dpi / 72
    if width * height * scale * scale > options.page_pixels:
        # A page the size of a wall (a PDF bomb) renders at a lower resolution instead.
        scale = math.sqrt(options.page_pixels / max(width * height, 1.0))
    # RGB straight from pdfium: no byte-order swap and no conversion copy afterwards.
    bitmap = page.render(scale=scale, rotation=0, may_draw_forms=True, rev_byteorder=True)
    image = bitmap.to_pil()
    if image.mode != "RGB":
        image = image.convert("RGB")
    bitmap.close()
    page.close()
    points = (image.width / scale, image.height / scale)  # the page's size, kept
    if options.page_format != "jpeg":
        samples = image.tobytes()
        deflated = zlib.compress(samples, 1)
        # "auto": text and drawings deflate to a few per cent and stay exact; a page that
        # does not (photos, scans) is much smaller as JPEG.
        if options.page_format == "lossless" or len(deflated) <= len(samples) * AUTO_LOSSLESS:
            writer.add_deflated(deflated, image.width, image.height, points)
            return
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=options.jpeg_quality, optimize=False)
    writer.add_jpeg(encoded.getvalue(), image.width, image.height, points)


def office_to_pdf(source: Path, workdir: Path, options: Options) -> Path:
    """LibreOffice headless, with a profile of its own in the private directory (so that
    conversions can run side by side) and no macros run."""
    outdir = workdir / "lo-out"
    outdir.mkdir()
    command = [options.soffice, "--headless", "--norestore", "--nolockcheck", "--nodefault",
               "--nologo", f"-env:UserInstallation=file://{workdir / 'lo-profile'}",
               "--convert-to", "pdf", "--outdir", str(outdir), str(source)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=options.wall,
                              stdin=subprocess.DEVNULL, check=False,
                              env={**os.environ, "HOME": str(workdir)})
    except FileNotFoundError:
        raise ConversionFailed(f"LibreOffice is not installed ({options.soffice})") from None
    except subprocess.TimeoutExpired:
        raise ConversionFailed("LibreOffice took too long") from None
    produced = outdir / (source.stem + ".pdf")
    said = (done.stderr + done.stdout).decode("utf-8", "replace").strip()[-300:]
    if done.returncode == 0 and not produced.exists() and _CANNOT_LOAD in said:
        # How soffice answers a file no filter can load: that line, exit 0, no output.
        # Anything else without output (a crash, a kill, a profile it could not make) may
        # pass on another try: on_failure.
        raise Unreadable(f"LibreOffice cannot load it: {_CANNOT_LOAD}")
    if done.returncode != 0 or not produced.exists():
        raise ConversionFailed(f"LibreOffice could not convert it (exit {done.returncode}"
                               + (f": {said}" if said else "") + ")")
    return produced


def reencode_image(source: Path, target: Path, options: Options) -> None:
    """The picture's pixels only: EXIF (GPS, camera), comments, ICC profiles and text chunks
    are left behind; EXIF rotation is applied first so the picture still looks right."""
    from PIL import Image, ImageOps
    # Our own check below reads the size from the header and says what it found; Pillow's
    # would raise first with its own limit. The worker's memory limit is the backstop.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(source) as image:
            if image.width * image.height > options.image_pixels:
                raise ConversionFailed(f"a picture of {image.width} x {image.height} pixels; "
                                       f"the limit is {options.image_pixels} pixels")
            image.seek(0)  # an animation keeps its first frame
            upright = ImageOps.exif_transpose(image)
            mode = "RGB" if options.image_format == "jpeg" else (
                "RGBA" if "A" in upright.getbands() or "transparency" in image.info else "RGB")
            pixels = upright.convert(mode)
    except ConversionFailed:
        raise
    except Image.DecompressionBombError as exc:  # a limit, not a statement about the data
        raise ConversionFailed(f"a picture over Pillow's limits ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        # UnidentifiedImageError (an OSError), "image file is truncated", a broken chunk.
        raise Unreadable(f"not a picture Pillow can read ({exc})") from None
    clean = Image.frombytes(pixels.mode, pixels.size, pixels.tobytes())
    if options.image_format == "jpeg":
        clean.save(target, "JPEG", quality=options.jpeg_quality)
    else:
        clean.save(target, "PNG", compress_level=3)
