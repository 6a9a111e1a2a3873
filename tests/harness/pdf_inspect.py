"""What is really inside a PDF or an image, for asserting that the neutralize milter flattened it.

`inspect_pdf` reads every object in the file (pikepdf's object table, so orphans, object
streams and incremental updates count too, not only what the page tree reaches) and reports
active content: JavaScript and automatic actions, annotations, links, embedded files, forms,
fonts or text, and the images each page draws. A properly flattened PDF has pages of
images and nothing else (`PdfFacts.is_flat`).

    facts = inspect_pdf(out)
    assert facts.is_flat and facts.pages == 3, facts

`image_metadata` lists what Pillow sees in an image: EXIF (and its GPS IFD), comments,
PNG text chunks, ICC profile, XMP.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pikepdf
from PIL import ExifTags, Image
from pikepdf import Name

_TEXT_OPS = {"Tj", "TJ", "'", '"'}
_ACTIONS = {f"/{a}" for a in (
    "GoTo GoToR GoToE GoTo3DView Launch Thread URI Sound Movie Hide Named SubmitForm ResetForm "
    "ImportData JavaScript SetOCGState Rendition Trans RichMediaExecute").split()}


@dataclass
class PdfFacts:
    """Facts about one PDF; `details` says which key or object set each flag."""

    pages: int = 0
    encrypted: bool = False
    has_javascript: bool = False          # /JS, /JavaScript, /S /JavaScript, /AA, an /OpenAction action
    has_open_action: bool = False         # any /OpenAction, even a mere destination ([page /Fit])
    has_annotations: bool = False         # a non-empty /Annots on some page
    has_links: bool = False               # a /Link annotation or a /URI anywhere
    has_embedded_files: bool = False      # /EmbeddedFiles, /EF, /Type /EmbeddedFile, /FileAttachment
    has_forms: bool = False               # /AcroForm, /XFA, widget annotations, form fields
    fonts_or_text: bool = False           # a /Font anywhere, or a text-showing operator on a page
    images_per_page: list[int] = field(default_factory=list)
    actions: set[str] = field(default_factory=set)    # action types (/S) seen: /URI, /Launch...
    uris: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @property
    def is_flat(self) -> bool:
        """Only pages of images: nothing active, no text, at least one image on every page."""
        return (self.pages > 0 and not (self.has_javascript or self.has_annotations or self.has_links
                                        or self.has_embedded_files or self.has_forms
                                        or self.fonts_or_text or self.actions)
                and all(n > 0 for n in self.images_per_page))


def _flag(facts: PdfFacts, attr: str, why: str) -> None:
    """Set facts.<attr> and remember why (first few reasons only)."""
    setattr(facts, attr, True)
    if len(facts.details) < 50:
        facts.details.append(f"{attr}: {why}")


def _dict_items(obj: Any) -> list[tuple[str, Any]]:
    """(key, value) pairs of a dictionary or of a stream's dictionary."""
    if isinstance(obj, pikepdf.Stream):
        return list(obj.stream_dict.items())
    return list(obj.items())


def _check_dict(facts: PdfFacts, obj: Any, where: str) -> None:
    """Look at one dictionary's keys and type names."""
    items = dict(_dict_items(obj))
    keys = set(items)
    typ, sub, s = (str(items.get(k, "")) for k in ("/Type", "/Subtype", "/S"))
    for key in keys & {"/JS", "/JavaScript", "/AA"}:
        _flag(facts, "has_javascript", f"{key} in {where}")
    if "/OpenAction" in keys:
        _flag(facts, "has_open_action", f"/OpenAction in {where}")
        if isinstance(items["/OpenAction"], pikepdf.Dictionary):   # an action, not a destination
            _flag(facts, "has_javascript", f"/OpenAction action in {where}")
    if s in _ACTIONS and typ in ("", "/Action"):
        facts.actions.add(s)
        if s == "/JavaScript":
            _flag(facts, "has_javascript", f"/S /JavaScript in {where}")
    if "/URI" in keys:
        _flag(facts, "has_links", f"/URI in {where}")
        if isinstance(items["/URI"], pikepdf.String):
            facts.uris.append(str(items["/URI"]))
    if sub == "/Link":
        _flag(facts, "has_links", f"/Link annotation {where}")
    embedded = keys & {"/EmbeddedFiles", "/EF"}
    if embedded or typ == "/EmbeddedFile" or sub == "/FileAttachment":
        _flag(facts, "has_embedded_files", f"{sorted(embedded) or typ or sub} in {where}")
    form = keys & {"/AcroForm", "/XFA", "/FT"}
    if form or sub == "/Widget":
        _flag(facts, "has_forms", f"{sorted(form) or sub} in {where}")
    if "/Font" in keys or typ == "/Font":
        _flag(facts, "fonts_or_text", f"font in {where}")


def _walk_objects(pdf: pikepdf.Pdf, facts: PdfFacts) -> None:
    """Visit every indirect object and the direct dictionaries/arrays nested in it."""
    roots: list[tuple[Any, str]] = [(pdf.trailer, "trailer")]
    roots += [(o, f"obj {o.objgen[0]} {o.objgen[1]}") for o in pdf.objects
              if isinstance(o, (pikepdf.Dictionary, pikepdf.Array, pikepdf.Stream))]
    for root, where in roots:
        stack = [root]
        while stack:
            obj = stack.pop()
            if isinstance(obj, pikepdf.Array):
                children = list(obj)
            elif isinstance(obj, (pikepdf.Dictionary, pikepdf.Stream)):
                _check_dict(facts, obj, where)
                children = [v for _, v in _dict_items(obj)]
            else:
                continue
            stack += [c for c in children if isinstance(c, (pikepdf.Dictionary, pikepdf.Array))
                      and not c.is_indirect]


def _resources_images(res: Any, seen: set[tuple[int, int]]) -> tuple[int, list[Any]]:
    """Image XObjects in a resource dictionary (recursing into forms) and the form streams found."""
    count, forms = 0, []
    xobjects = res.get("/XObject") if isinstance(res, pikepdf.Dictionary) else None
    for _, x in (xobjects.items() if isinstance(xobjects, pikepdf.Dictionary) else []):
        if not isinstance(x, pikepdf.Stream) or x.objgen in seen:
            continue
        seen.add(x.objgen)
        if x.get("/Subtype") == Name.Image:
            count += 1
        elif x.get("/Subtype") == Name.Form:
            forms.append(x)
            n, more = _resources_images(x.get("/Resources"), seen)
            count, forms = count + n, forms + more
    return count, forms


def _scan_content(content: Any) -> tuple[int, bool]:
    """(inline images, any text-showing operator) in a page or form content stream."""
    try:
        ops = pikepdf.parse_content_stream(content)
    except pikepdf.PdfError:
        return 0, False
    inline = sum(isinstance(op, pikepdf.ContentStreamInlineImage) for op in ops)
    text = any(not isinstance(op, pikepdf.ContentStreamInlineImage) and str(op.operator) in _TEXT_OPS
               for op in ops)
    return inline, text


def inspect_pdf(path: Path | str, password: str = "") -> PdfFacts:
    """Everything active or textual in the PDF at `path`, from all of its objects."""
    facts = PdfFacts()
    with pikepdf.open(path, password=password) as pdf:
        facts.encrypted = pdf.is_encrypted
        facts.pages = len(pdf.pages)
        _walk_objects(pdf, facts)
        parsed: dict[tuple, tuple[int, bool]] = {}
        for number, page in enumerate(pdf.pages, 1):
            annots = page.obj.get("/Annots")
            if isinstance(annots, pikepdf.Array) and len(annots):
                _flag(facts, "has_annotations", f"{len(annots)} /Annots on page {number}")
            images, forms = _resources_images(page.obj.get("/Resources"), set())
            contents = page.obj.get("/Contents")
            key = tuple(c.objgen for c in (contents if isinstance(contents, pikepdf.Array) else [contents])
                        if c is not None)
            if key not in parsed or not key:
                parsed[key] = _scan_content(page)
            inline, text = parsed[key]
            for form in forms:
                n, t = _scan_content(form)
                inline, text = inline + n, text or t
            if text:
                _flag(facts, "fonts_or_text", f"text operators on page {number}")
            facts.images_per_page.append(images + inline)
    return facts


def jpeg_has_exif(path: Path | str) -> bool:
    """True if the image (a JPEG) carries an EXIF block with at least one tag."""
    with Image.open(path) as im:
        return bool(im.info.get("exif")) or len(im.getexif()) > 0


def _plain(value: Any) -> Any:
    """EXIF values as plain Python: rationals to float, bytes to str, tuples to lists."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if hasattr(value, "numerator") and not isinstance(value, int):
        return float(value)
    return value


def image_metadata(path: Path | str) -> dict[str, Any]:
    """EXIF (base, Exif IFD, GPS), JPEG comment, PNG text chunks, ICC and XMP as Pillow reads them.

    Pillow refuses decompression bombs at open (DecompressionBombError); that propagates.
    """
    with Image.open(path) as im:
        exif = im.getexif()
        ifds = {ifd: exif.get_ifd(ifd) for ifd in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo)}
        text = dict(getattr(im, "text", {}) or {}) if im.format == "PNG" else {}
        comment = im.info.get("comment")
        return {
            "format": im.format, "size": im.size, "mode": im.mode,
            "exif": {ExifTags.TAGS.get(t, t): _plain(v) for t, v in exif.items()
                     if t not in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo)},
            "exif_ifd": {ExifTags.TAGS.get(t, t): _plain(v) for t, v in ifds[ExifTags.IFD.Exif].items()},
            "gps": {ExifTags.GPSTAGS.get(t, t): _plain(v) for t, v in ifds[ExifTags.IFD.GPSInfo].items()},
            "comment": _plain(comment) if comment else None,
            "text": text,
            "icc_profile": len(im.info.get("icc_profile") or b""),
            "xmp": bool(im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")),
            "info_keys": sorted(str(k) for k in im.info),
        }
