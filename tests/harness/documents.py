"""Real documents and archives for the neutralize milter's tests, built from the specs.

Every builder writes into the path it is given (and returns it): OOXML/ODF packages are
ZIPs of XML parts written here by hand (ECMA-376, ODF 1.2), PDFs come from pikepdf,
images from Pillow, archives from the real `7z` binary or from our own ZIP writer
(APPNOTE 6.3: headers, ZipCrypto, Zip64 sizes). Builders are deterministic except where
a tool insists on random salts (7z encryption, AES PDFs, msoffcrypto). They never need
the network; the bombs build in about a second without holding their expanded size.
docx/docm/odt spread `paragraphs` over `pages` pages in order (a page left without one reads
"Page N"); keep each page's text short enough to fit. PDF text is Helvetica (WinAnsi), so
non-Latin characters in `pdf(text=...)` come out as "?"; use the office builders for Japanese.

    docx(tmp / "a.docx", ["見積書", "Total: 12,000 JPY"], pages=3)
    zip_zipcrypto_python(tmp / "ppap.zip", {"請求書.txt": b"..."}, "pass")
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import tempfile
import zipfile
import zlib
from pathlib import Path
from xml.sax.saxutils import escape

import msoffcrypto.format.ooxml
import pikepdf
from PIL import Image, PngImagePlugin
from pikepdf import Array, Dictionary, Name

FIXED_TIME = (2024, 4, 1, 9, 0, 0)          # every ZIP member's timestamp (determinism)
_DOS_TIME = (9 << 11, ((2024 - 1980) << 9) | (4 << 5) | 1)
GiB = 1 << 30
PHISH_URL = "https://evil.example/phish"

# ---------------------------------------------------------------- ZIP packages (OOXML/ODF)

_XML = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_PKG_RELS = "http://schemas.openxmlformats.org/package/2006/relationships"
_DOC_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
_VBA_REL = "http://schemas.microsoft.com/office/2006/relationships/vbaProject"


def _write(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` and return it as a Path."""
    path = Path(path)
    path.write_bytes(data)
    return path


def _zip_parts(parts: dict[str, bytes | str]) -> bytes:
    """A ZIP package in dict order; a part named `mimetype` is stored, the rest deflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in parts.items():
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_STORED if name == "mimetype" else zipfile.ZIP_DEFLATED
            zf.writestr(info, data.encode() if isinstance(data, str) else data)
    return buf.getvalue()


def _content_types(overrides: dict[str, str], extra: dict[str, str] | None = None) -> str:
    """[Content_Types].xml: rels/xml (and `extra`) defaults by extension, per-part overrides."""
    d = {"rels": "application/vnd.openxmlformats-package.relationships+xml",
         "xml": "application/xml", **(extra or {})}
    return (_XML + '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            + "".join(f'<Default Extension="{e}" ContentType="{t}"/>' for e, t in d.items())
            + "".join(f'<Override PartName="{p}" ContentType="{t}"/>' for p, t in overrides.items())
            + "</Types>")


def _rels(rels: list[tuple[str, str]]) -> str:
    """A .rels part: (type URI, target) pairs numbered rId1, rId2, ..."""
    return (_XML + f'<Relationships xmlns="{_PKG_RELS}">'
            + "".join(f'<Relationship Id="rId{i}" Type="{t}" Target="{target}"/>'
                      for i, (t, target) in enumerate(rels, 1))
            + "</Relationships>")


def _split_pages(paragraphs: list[str], pages: int) -> list[list[str]]:
    """Contiguous near-equal chunks, one per page; a page left empty gets 'Page N'."""
    n, chunks = len(paragraphs), []
    for i in range(pages):
        chunk = paragraphs[-(-i * n // pages):-(-(i + 1) * n // pages)]
        chunks.append(chunk or [f"Page {i + 1}"])
    return chunks


def _document_xml(paragraphs: list[str], pages: int) -> str:
    """word/document.xml: A4 section, Japanese-capable runs, pageBreakBefore on each new page."""
    body = []
    for chunk in _split_pages(paragraphs, pages):
        for j, text in enumerate(chunk):
            ppr = "<w:pPr><w:pageBreakBefore/></w:pPr>" if j == 0 and body else ""
            body.append(f'<w:p>{ppr}<w:r><w:rPr><w:rFonts w:eastAsia="MS Mincho"/>'
                        f'<w:lang w:val="en-US" w:eastAsia="ja-JP"/></w:rPr>'
                        f'<w:t xml:space="preserve">{escape(text)}</w:t></w:r></w:p>')
    sect = ('<w:sectPr><w:pgSz w:w="11906" w:h="16838"/><w:pgMar w:top="1440" w:right="1440"'
            ' w:bottom="1440" w:left="1440" w:header="720" w:footer="720" w:gutter="0"/></w:sectPr>')
    return _XML + f'<w:document xmlns:w="{_W}"><w:body>{"".join(body)}{sect}</w:body></w:document>'


def _word(paragraphs: list[str], pages: int, macro: str | None = None, thumbnail: bool = False) -> bytes:
    """A WordprocessingML package: .docx, or .docm carrying `macro`; optionally a PNG thumbnail."""
    main = ("application/vnd.ms-word.document.macroEnabled.main+xml" if macro is not None else
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml")
    types = {"bin": "application/vnd.ms-office.vbaProject"} if macro is not None else {}
    rels = [(f"{_DOC_REL}/officeDocument", "word/document.xml")]
    if thumbnail:
        types["png"] = "image/png"
        rels.append((f"{_PKG_RELS}/metadata/thumbnail", "docProps/thumbnail.png"))
    parts: dict[str, bytes | str] = {
        "[Content_Types].xml": _content_types({"/word/document.xml": main}, types),
        "_rels/.rels": _rels(rels), "word/document.xml": _document_xml(paragraphs, pages)}
    if thumbnail:   # incompressible noise: ~9 KB, like the thumbnails Word saves
        noise = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(96 * 96 // 32))
        buf = io.BytesIO()
        Image.frombytes("L", (96, 96), noise).save(buf, "PNG")
        parts["docProps/thumbnail.png"] = buf.getvalue()
    if macro is not None:
        parts["word/_rels/document.xml.rels"] = _rels([(_VBA_REL, "vbaProject.bin")])
        parts["word/vbaProject.bin"] = vba_project_bin(macro)
    return _zip_parts(parts)


def docx(path: Path | str, paragraphs: list[str], pages: int = 1) -> Path:
    """A minimal valid Word .docx (3 parts, UTF-8, CJK runs); LibreOffice lays it out on `pages` pages."""
    return _write(path, _word(paragraphs, pages))


DEFAULT_MACRO = 'Sub AutoOpen()\r\n    MsgBox "mailmoat test macro"\r\nEnd Sub\r\n'


def docm(path: Path | str, paragraphs: list[str], pages: int = 1, macro: str = DEFAULT_MACRO) -> Path:
    """A .docm: macroEnabled main type plus a real VBA project (CFB, MS-OVBA dir, AutoOpen macro)."""
    return _write(path, _word(paragraphs, pages, macro))


def xlsx(path: Path | str, rows: list[list[str | int]]) -> Path:
    """A minimal valid .xlsx: one sheet, numbers as numbers, text as inline strings."""
    def col(i: int) -> str:
        return col(i // 26 - 1) + chr(65 + i % 26) if i >= 26 else chr(65 + i)

    def cell(ref: str, v: str | int) -> str:
        if isinstance(v, int):
            return f'<c r="{ref}"><v>{v}</v></c>'
        return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{escape(v)}</t></is></c>'
    sml = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    sheet = "".join(f'<row r="{r}">' + "".join(cell(f"{col(c)}{r}", v) for c, v in enumerate(row))
                    + "</row>" for r, row in enumerate(rows, 1))
    ct = "application/vnd.openxmlformats-officedocument.spreadsheetml"
    return _write(path, _zip_parts({
        "[Content_Types].xml": _content_types({"/xl/workbook.xml": f"{ct}.sheet.main+xml",
                                               "/xl/worksheets/sheet1.xml": f"{ct}.worksheet+xml"}),
        "_rels/.rels": _rels([(f"{_DOC_REL}/officeDocument", "xl/workbook.xml")]),
        "xl/workbook.xml": _XML + f'<workbook xmlns="{sml}" xmlns:r="{_DOC_REL}"><sheets>'
                           '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": _rels([(f"{_DOC_REL}/worksheet", "worksheets/sheet1.xml")]),
        "xl/worksheets/sheet1.xml": _XML + f'<worksheet xmlns="{sml}"><sheetData>{sheet}</sheetData>'
                                    '</worksheet>'}))


def odt(path: Path | str, paragraphs: list[str], pages: int = 1) -> Path:
    """A minimal ODF text document: stored `mimetype` first, manifest, content.xml with page breaks."""
    ns = ('xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
          'xmlns:style="urn:oasis:names:tc:opendocument:xmlns:style:1.0" '
          'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" '
          'xmlns:fo="urn:oasis:names:tc:opendocument:xmlns:xsl-fo-compatible:1.0"')
    brk = ' text:style-name="Break"'
    body = "".join(f'<text:p{brk if j == 0 and i else ""}>{escape(t)}</text:p>'
                   for i, chunk in enumerate(_split_pages(paragraphs, pages)) for j, t in enumerate(chunk))
    content = (_XML + f'<office:document-content {ns} office:version="1.2"><office:automatic-styles>'
               '<style:style style:name="Break" style:family="paragraph">'
               '<style:paragraph-properties fo:break-before="page"/></style:style>'
               f'</office:automatic-styles><office:body><office:text>{body}</office:text>'
               '</office:body></office:document-content>')
    mime = "application/vnd.oasis.opendocument.text"
    manifest = (_XML + '<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:'
                f'manifest:1.0" manifest:version="1.2"><manifest:file-entry manifest:full-path="/" '
                f'manifest:version="1.2" manifest:media-type="{mime}"/><manifest:file-entry '
                'manifest:full-path="content.xml" manifest:media-type="text/xml"/></manifest:manifest>')
    return _write(path, _zip_parts({"mimetype": mime, "META-INF/manifest.xml": manifest,
                                    "content.xml": content}))


def encrypted_docx(path: Path | str, password: str = "secret") -> Path:
    """A password-protected .docx: our docx in an ECMA-376 Agile (AES) CFB envelope, as Word writes it.

    The package carries a thumbnail so it exceeds 4 KiB: msoffcrypto 6.x writes a corrupt
    container when EncryptedPackage fits in the CFB mini stream (nolze/msoffcrypto-tool#105).
    """
    out, plain = io.BytesIO(), _word(["Confidential / 社外秘", "Quarterly figures"], 1, thumbnail=True)
    assert len(plain) > 4096 + 64, "msoffcrypto needs a package larger than the mini-stream cutoff"
    msoffcrypto.format.ooxml.OOXMLFile(io.BytesIO(plain)).encrypt(password, out)
    return _write(path, out.getvalue())


# ---------------------------------------------------------------- VBA project (MS-CFB, MS-OVBA)

_FREE, _END, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def cfb(streams: dict[str, bytes]) -> bytes:
    """A version-3 compound file (MS-CFB) holding `streams` ('/' makes storages); streams < 4 KiB."""
    nodes: list[dict] = [{"name": "Root Entry", "type": 5, "kids": [], "data": b""}]
    index: dict[str, int] = {"": 0}
    for p, data in streams.items():
        assert len(data) < 4096, "only mini-stream streams are supported"
        parts = p.split("/")
        for depth in range(1, len(parts) + 1):
            key = "/".join(parts[:depth])
            if key not in index:
                index[key] = len(nodes)
                nodes[index["/".join(parts[:depth - 1])]]["kids"].append(len(nodes))
                nodes.append({"name": parts[depth - 1], "type": 2 if depth == len(parts) else 1,
                              "kids": [], "data": data if depth == len(parts) else b""})
    for n in nodes:   # children as a balanced red-black tree: deepest level red, the rest black
        n.update(left=_NOSTREAM, right=_NOSTREAM, child=_NOSTREAM, color=1)
    for n in nodes:
        kids = sorted(n["kids"], key=lambda k: (len(nodes[k]["name"]), nodes[k]["name"].upper()))
        depths: dict[int, int] = {}

        def tree(lo: int, hi: int, d: int) -> int:
            if lo >= hi:
                return _NOSTREAM
            mid = (lo + hi) // 2
            k = kids[mid]
            depths[k] = d
            nodes[k]["left"], nodes[k]["right"] = tree(lo, mid, d + 1), tree(mid + 1, hi, d + 1)
            return k
        n["child"] = tree(0, len(kids), 0)
        for k, d in depths.items():
            nodes[k]["color"] = 0 if d == max(depths.values()) > 0 else 1
    mini, minifat = bytearray(), []
    for n in nodes[1:]:
        n["start"], n["size"] = (len(mini) // 64, len(n["data"])) if n["type"] == 2 else (0, 0)
        if n["type"] == 2:
            count = max(1, -(-len(n["data"]) // 64))
            minifat += [n["start"] + i + 1 for i in range(count - 1)] + [_END]
            mini += n["data"].ljust(count * 64, b"\0")
    dir_secs, mf_secs, ms_secs = -(-len(nodes) // 4), -(-len(minifat) // 128), -(-len(mini) // 512)
    nodes[0]["start"], nodes[0]["size"] = 1 + dir_secs + mf_secs, len(mini)
    assert 1 + dir_secs + mf_secs + ms_secs <= 128, "one FAT sector only"
    fat = [_FATSECT]
    for first, count in ((1, dir_secs), (1 + dir_secs, mf_secs), (1 + dir_secs + mf_secs, ms_secs)):
        fat += [first + i + 1 for i in range(count - 1)] + [_END]
    fat += [_FREE] * (128 - len(fat))
    entries = b""
    for n in nodes:
        name = n["name"].encode("utf-16-le")
        entries += struct.pack("<64sHBBIII16sIQQIQ", name, len(name) + 2, n["type"], n["color"],
                               n["left"], n["right"], n["child"], b"", 0, 0, 0, n["start"], n["size"])
    entries += struct.pack("<64sHBBIII16sIQQIQ", b"", 0, 0, 0, _NOSTREAM, _NOSTREAM, _NOSTREAM,
                           b"", 0, 0, 0, 0, 0) * (dir_secs * 4 - len(nodes))
    header = struct.pack("<8s16sHHHHH6sIIIIIIIII", bytes.fromhex("D0CF11E0A1B11AE1"), b"", 0x3E, 3,
                         0xFFFE, 9, 6, b"", 0, 1, 1, 0, 4096, 1 + dir_secs if mf_secs else _END,
                         mf_secs, _END, 0) + struct.pack("<109I", 0, *[_FREE] * 108)
    minifat += [_FREE] * (mf_secs * 128 - len(minifat))
    return (header + struct.pack("<128I", *fat) + entries + struct.pack(f"<{len(minifat)}I", *minifat)
            + bytes(mini).ljust(ms_secs * 512, b"\0"))


def ovba_compress(data: bytes) -> bytes:
    """MS-OVBA 2.4.1 CompressedContainer using literal tokens only (valid; any decompressor reads it)."""
    out = bytearray(b"\x01")
    for i in range(0, len(data), 4096):
        chunk = data[i:i + 4096]
        if len(chunk) == 4096:            # all-literal would exceed 4098 bytes: raw chunk
            out += struct.pack("<H", 0x3FFF) + chunk
            continue
        body = b"".join(b"\x00" + chunk[j:j + 8] for j in range(0, len(chunk), 8))
        out += struct.pack("<H", 0xB000 | (len(body) + 2 - 3)) + body
    return bytes(out)


def vba_project_bin(macro: str = DEFAULT_MACRO, module: str = "ThisDocument") -> bytes:
    """word/vbaProject.bin: PROJECT, PROJECTwm, VBA/_VBA_PROJECT, VBA/dir and one document module."""
    def rec(rid: int, data: bytes) -> bytes:
        return struct.pack("<HI", rid, len(data)) + data
    name, uname = module.encode(), module.encode("utf-16-le")
    dir_stream = b"".join([
        rec(1, struct.pack("<I", 1)), rec(2, struct.pack("<I", 0x409)), rec(0x14, struct.pack("<I", 0x409)),
        rec(3, struct.pack("<H", 1252)), rec(4, b"Project"), rec(5, b""), rec(0x40, b""), rec(6, b""),
        rec(0x3D, b""), rec(7, struct.pack("<I", 0)), rec(8, struct.pack("<I", 0)),
        struct.pack("<HIIH", 9, 4, 1, 0), rec(0x0C, b""), rec(0x3C, b""),
        rec(0x0F, struct.pack("<H", 1)), rec(0x13, struct.pack("<H", 0xFFFF)),
        rec(0x19, name), rec(0x47, uname), rec(0x1A, name), rec(0x32, uname), rec(0x1C, b""),
        rec(0x48, b""), rec(0x31, struct.pack("<I", 0)), rec(0x1E, struct.pack("<I", 0)),
        rec(0x2C, struct.pack("<H", 0xFFFF)), rec(0x22, b""), rec(0x2B, b""), rec(0x10, b"")])
    source = (f'Attribute VB_Name = "{module}"\r\nAttribute VB_Base = "1Normal.{module}"\r\n'
              'Attribute VB_GlobalNameSpace = False\r\nAttribute VB_Creatable = False\r\n'
              'Attribute VB_PredeclaredId = True\r\nAttribute VB_Exposed = True\r\n' + macro)
    project = (f'ID="{{5D1E0F2A-3C4B-4D6E-8F70-123456789ABC}}"\r\nDocument={module}/&H00000000\r\n'
               'Name="Project"\r\nHelpContextID="0"\r\nVersionCompatible32="393222000"\r\n\r\n'
               '[Host Extender Info]\r\n&H00000001={3832D640-CF90-11CF-8E43-00A0C911005A};VBE;'
               f'&H00000000\r\n\r\n[Workspace]\r\n{module}=0, 0, 0, 0, C\r\n')
    return cfb({"PROJECT": project.encode(), "PROJECTwm": name + b"\0" + uname + b"\0\0\0\0",
                "VBA/_VBA_PROJECT": b"\xcc\x61\xff\xff\x00\x00\x00",
                "VBA/dir": ovba_compress(dir_stream), f"VBA/{module}": ovba_compress(source.encode())})


# ---------------------------------------------------------------- PDF (pikepdf)

def _text_stream(lines: list[str]) -> bytes:
    """A page content stream showing `lines` in 12pt Helvetica from the top-left margin."""
    ops: list[tuple[list, str]] = [([], "BT"), ([Name.F1, 12], "Tf"), ([14], "TL"), ([72, 770], "Td")]
    for line in lines:
        ops += [([pikepdf.String(line.encode("cp1252", "replace"))], "Tj"), ([], "T*")]
    return pikepdf.unparse_content_stream(ops + [([], "ET")])


def _new_pdf(pages: int, contents: list[bytes] | bytes) -> pikepdf.Pdf:
    """A Pdf with `pages` A4 pages (Kids written directly: fast) and a shared Helvetica resource."""
    pdf = pikepdf.new()
    font = Dictionary(Type=Name.Font, Subtype=Name.Type1, BaseFont=Name.Helvetica,
                      Encoding=Name.WinAnsiEncoding)
    res = pdf.make_indirect(Dictionary(Font=Dictionary(F1=pdf.make_indirect(font))))
    shared = pdf.make_stream(contents) if isinstance(contents, bytes) else None
    root = pdf.Root.Pages
    root.Kids = Array([pdf.make_indirect(Dictionary(
        Type=Name.Page, Parent=root, MediaBox=[0, 0, 595, 842], Resources=res,
        Contents=shared if shared is not None else pdf.make_stream(contents[i])))
        for i in range(pages)])
    root.Count = pages
    pdf.docinfo = pdf.make_indirect(Dictionary(Title=pikepdf.String("Invoice 2024-04"),
                                               Author=pikepdf.String("Taro Yamada"),
                                               Creator=pikepdf.String("Microsoft Word")))
    return pdf


def _text_pdf(pages: int, text: str, javascript: bool, embedded_file: bool, link: bool) -> pikepdf.Pdf:
    """The document behind pdf() and the encrypted variants."""
    contents = [_text_stream([f"Page {i + 1} of {pages}", *text.splitlines(), "Click here to verify"])
                for i in range(pages)]
    pdf = _new_pdf(pages, contents)
    names = Dictionary()
    if javascript:
        pdf.Root.OpenAction = Dictionary(S=Name.JavaScript, JS=pikepdf.String("app.alert('opened');"))
        js = pdf.make_indirect(Dictionary(S=Name.JavaScript, JS=pikepdf.String("this.print(false);")))
        names.JavaScript = Dictionary(Names=Array([pikepdf.String("init"), js]))
    if embedded_file:
        payload = b"MZ not really an executable\n"
        blob = pdf.make_stream(payload, Type=Name.EmbeddedFile, Params=Dictionary(Size=len(payload)))
        spec = pdf.make_indirect(Dictionary(Type=Name.Filespec, F=pikepdf.String("payload.exe"),
                                            UF=pikepdf.String("payload.exe"), EF=Dictionary(F=blob)))
        names.EmbeddedFiles = Dictionary(Names=Array([pikepdf.String("payload.exe"), spec]))
    if names.keys():
        pdf.Root.Names = names
    if link:   # over the "Click here" line of page 1
        annot = Dictionary(Type=Name.Annot, Subtype=Name.Link, Rect=[72, 700, 300, 716],
                           Border=[0, 0, 0], A=Dictionary(S=Name.URI, URI=pikepdf.String(PHISH_URL)))
        pdf.pages[0].obj.Annots = Array([pdf.make_indirect(annot)])
    return pdf


_DEFAULT_TEXT = ("Dear customer,\nPlease find the invoice for April attached.\n"
                 "Payment is due within 14 days.\nBest regards, Accounts")


def _save(pdf: pikepdf.Pdf, path: Path | str, encryption: pikepdf.Encryption | None = None) -> Path:
    """Save deterministically (a content-derived /ID) unless encrypting (random salts anyway)."""
    if encryption:
        pdf.save(path, encryption=encryption)
    else:
        pdf.save(path, deterministic_id=True)
    return Path(path)


def pdf(path: Path | str, pages: int, *, javascript: bool = False, embedded_file: bool = False,
        link: bool = False, text: str = _DEFAULT_TEXT) -> Path:
    """A text PDF (Helvetica Type1, several lines a page), optionally with JS, an attachment, a link."""
    return _save(_text_pdf(pages, text, javascript, embedded_file, link), path)


def pdf_many_pages(path: Path | str, pages: int = 10_000) -> Path:
    """A huge page count cheaply: every page shares one content stream (10,000 pages in < 1 s)."""
    return _save(_new_pdf(pages, _text_stream(["One of many identical pages"])), path)


def encrypted_pdf(path: Path | str, user_password: str = "secret", owner_password: str = "owner") -> Path:
    """A PDF that needs `user_password` to open (R6, AES-256, as Acrobat writes today)."""
    return _save(_text_pdf(2, _DEFAULT_TEXT, False, False, False), path,
                 pikepdf.Encryption(owner=owner_password, user=user_password, R=6))


def owner_only_pdf(path: Path | str, owner_password: str = "owner") -> Path:
    """An AES-256 PDF with an empty user password (opens without one) and restricted permissions."""
    perms = pikepdf.Permissions(extract=False, modify_other=False, print_highres=False)
    return _save(_text_pdf(2, _DEFAULT_TEXT, False, False, False), path,
                 pikepdf.Encryption(owner=owner_password, user="", R=6, allow=perms))


# ---------------------------------------------------------------- images (Pillow)

def _gradient(w: int, h: int) -> Image.Image:
    """A deterministic RGB picture with some structure (so encoders do real work)."""
    ramp = Image.linear_gradient("L")
    img, across = ramp.resize((w, h)), ramp.transpose(Image.Transpose.ROTATE_90).resize((w, h))
    return Image.merge("RGB", (img, across, img))


def jpeg_with_gps(path: Path | str) -> Path:
    """A camera-like JPEG: EXIF Make/Model/DateTime, a GPS IFD (Tokyo), and a COM comment."""
    path = Path(path)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "Canon", "Canon EOS R6", "2024:04:01 09:00:00"
    exif[0x8825] = {1: "N", 2: (35.0, 41.0, 22.35), 3: "E", 4: (139.0, 41.0, 30.12),
                    5: 0, 6: 40.0}
    _gradient(320, 240).save(path, "JPEG", quality=85, exif=exif, comment=b"Shot at the office")
    with Image.open(path) as im:
        assert im.getexif().get_ifd(0x8825).get(2) and im.info.get("comment"), "EXIF/GPS lost"
    return path


def png(path: Path | str, w: int = 64, h: int = 48, text: dict[str, str] | None = None) -> Path:
    """A small RGB PNG, optionally with tEXt chunks (metadata the neutralizer must drop)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    _gradient(w, h).save(path, "PNG", pnginfo=info)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC over type+data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_image_header(path: Path | str, w: int = 50_000, h: int = 50_000) -> Path:
    """A ~4 KB PNG: a valid IHDR declaring w x h grey pixels, an IDAT starting a stream of zeros."""
    comp = zlib.compressobj(9)
    idat = comp.compress(bytes(4 << 20)) + comp.flush(zlib.Z_SYNC_FLUSH)   # deliberately unfinished
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return _write(path, b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                  + _png_chunk(b"IEND", b""))


# ---------------------------------------------------------------- archives

def zip_plain(path: Path | str, files: dict[str, bytes]) -> Path:
    """An ordinary deflated ZIP (UTF-8 names flagged by zipfile when needed)."""
    return _write(path, _zip_parts(dict(files)))


def _zip_raw(path: Path | str, entries: list[tuple[str, int, int, int, int, bytes]],
             name_encoding: str = "utf-8") -> Path:
    """Write a ZIP from (name, flags, method, crc, uncompressed size, payload); Zip64 sizes if needed."""
    out, central = bytearray(), bytearray()
    for name, flags, method, crc, usize, payload in entries:
        raw = name.encode(name_encoding)
        if name_encoding == "utf-8" and not name.isascii():
            flags |= 0x800
        big = usize >= 0xFFFFFFFF or len(payload) >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, usize, len(payload)) if big else b""
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if big else (len(payload), usize)
        need = 45 if big else 20
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, need, flags, method, *_DOS_TIME, crc, *sizes,
                           len(raw), len(extra)) + raw + extra + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x0300 | need, need, flags, method,
                               *_DOS_TIME, crc, *sizes, len(raw), len(extra), 0, 0, 0,
                               0o100644 << 16, offset) + raw + extra
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return _write(path, bytes(out + central) + eocd)


_CRC = [zlib.crc32(bytes([n]), 0xFFFFFFFF) ^ 0xFFFFFFFF for n in range(256)]   # CRC-32 byte table


def zipcrypto_encrypt(data: bytes, password: bytes, check_byte: int, salt: bytes) -> bytes:
    """Traditional PKWARE encryption (APPNOTE 6.1): 11 salt bytes + check byte, then the data."""
    k0, k1, k2 = 0x12345678, 0x23456789, 0x34567890
    out, plain = bytearray(), password + salt[:11] + bytes([check_byte]) + data
    for i, c in enumerate(plain):
        if i >= len(password):          # encrypt with the current keys, then mix in the plain byte
            t = (k2 | 2) & 0xFFFF
            out.append(c ^ (((t * (t ^ 1)) >> 8) & 0xFF))
        k0 = _CRC[(k0 ^ c) & 0xFF] ^ (k0 >> 8)
        k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k2 = _CRC[(k2 ^ (k1 >> 24)) & 0xFF] ^ (k2 >> 8)
    return bytes(out)


def zip_zipcrypto_python(path: Path | str, files: dict[str, bytes], password: str,
                         name_encoding: str = "utf-8") -> Path:
    """A ZipCrypto ZIP written by our own code (deflated, header check byte = CRC high byte)."""
    entries = []
    for name, data in files.items():
        crc = zlib.crc32(data)
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = c.compress(data) + c.flush()
        salt = hashlib.sha256(f"{password}\0{name}".encode()).digest()
        enc = zipcrypto_encrypt(body, password.encode(name_encoding), crc >> 24, salt)
        entries.append((name, 0x1, 8, crc, len(data), enc))
    return _zip_raw(path, entries, name_encoding)


def _seven_zip(path: Path | str, files: dict[str, bytes], args: list[str]) -> Path:
    """Run `7z a ARGS path FILES` over `files` written to a temporary directory (fixed mtimes)."""
    path = Path(path).resolve()
    path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            f = Path(tmp, name)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
            os.utime(f, (1711962000, 1711962000))
        subprocess.run(["7z", "a", "-bso0", "-bsp0", *args, "--", str(path), *files], cwd=tmp,
                       check=True, env={**os.environ, "LC_ALL": "C.UTF-8"}, stdout=subprocess.DEVNULL)
    return path


def zip_zipcrypto_7z(path: Path | str, files: dict[str, bytes], password: str) -> Path:
    """A ZipCrypto ZIP made by the real 7z (what PPAP senders' tools produce)."""
    return _seven_zip(path, files, ["-tzip", f"-p{password}", "-mem=ZipCrypto"])


def zip_aes_7z(path: Path | str, files: dict[str, bytes], password: str) -> Path:
    """A WinZip-AES-256 ZIP (method 99) made by the real 7z."""
    return _seven_zip(path, files, ["-tzip", f"-p{password}", "-mem=AES256"])


def sevenz_plain(path: Path | str, files: dict[str, bytes]) -> Path:
    """An unencrypted .7z archive."""
    return _seven_zip(path, files, ["-t7z"])


def sevenz_encrypted(path: Path | str, files: dict[str, bytes], password: str,
                     encrypt_headers: bool = False) -> Path:
    """An AES-256 .7z; with `encrypt_headers` even the file names need the password (-mhe=on)."""
    return _seven_zip(path, files, ["-t7z", f"-p{password}"] + (["-mhe=on"] if encrypt_headers else []))


def nested_zip(path: Path | str, inner: Path | str, depth: int) -> Path:
    """`inner` wrapped in `depth` plain ZIPs (levelN.zip holds levelN-1.zip ... level1.zip holds inner)."""
    name, data = Path(inner).name, Path(inner).read_bytes()
    for level in range(1, depth + 1):
        name, data = f"level{level}.zip", _zip_parts({name: data})
    return _write(path, data)


def zip_bomb(path: Path | str, size: int = 2 * GiB, name: str = "zeros.bin") -> Path:
    """A ~2 MB ZIP whose one entry inflates to `size` zeros (deflate's ~1030:1 limit; Zip64 >= 4 GiB)."""
    assert size % (1 << 20) == 0, "size must be whole MiB"
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)  # history reset: repeatable
    crc, mib = 0, bytes(1 << 20)
    for _ in range(size >> 20):
        crc = zlib.crc32(mib, crc)
    return _zip_raw(path, [(name, 0, 8, crc, size, block * (size >> 20) + b"\x03\x00")])


def nested_zip_bomb(path: Path | str, count: int = 10, size: int = 2 * GiB) -> Path:
    """A small ZIP of `count` zip bombs (count x size bytes once everything is expanded)."""
    with tempfile.TemporaryDirectory() as tmp:
        inner = zip_bomb(Path(tmp, "bomb.zip"), size).read_bytes()
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(count):
            info = zipfile.ZipInfo(f"bomb{i:02d}.zip", FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, inner, compresslevel=9)
    return Path(path)
