"""The `neutralize:` section of a policy, its rule action and its test expectations.

Which senders are suspicious is decided by the policy's rules (`when: {auth: {dmarc: [fail,
none]}}`, `subject`, client networks, senders); a rule says `then: {neutralize: neutralize}`
to apply this section's treatment, `pass` to leave the message alone, or a mapping that
switches single actions for that rule (`{links: keep, attachments: drop}`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from milters.core.policy.schema import (Bool, Duration, Either, Field, ListOf, Number, Reply,
                                        Str, Struct)
from milters.core.verdict import SmtpReply

MILTER = "neutralize"
ACTIONS = ("neutralize", "pass")
LINKS = ("defang", "keep")
HTML = ("sanitize", "prefer_text", "to_text", "keep")
ATTACHMENTS = ("convert", "drop", "keep")  # convert = by the `convert` table
ENCRYPTED = ("reject", "drop")
ON_FAILURE = ("tempfail", "drop", "reject")
ON_UNREADABLE = ("drop", "reject")  # never tempfail: no retry makes a broken file readable
# What the `convert` table can do with one attachment.
CONVERSIONS = ("flatten", "image", "keep", "drop")
KINDS = ("office", "pdf", "image", "archive", "text", "other")
PAGE_FORMATS = ("auto", "jpeg", "lossless")
IMAGE_FORMATS = ("png", "jpeg")
LANGUAGES = ("ja", "en")


@dataclass(frozen=True)
class Treatment:
    """What is done to a suspicious message; a rule may switch any of these."""

    links: str = "defang"  # URLs in text defanged; in HTML, anchors made inert
    html: str = "sanitize"
    attachments: str = "convert"
    encrypted: str = "reject"  # encrypted archives, Office and PDF files (the PPAP pattern)


@dataclass(frozen=True)
class Conversion:
    """One row of the table: the first row matching an attachment decides."""

    match: tuple[str, ...]  # kinds (pdf, office...), ".ext", "type/subtype", "type/*", "*"
    action: str


@dataclass(frozen=True)
class Limits:
    pages: int = 50  # more pages: the converter's failure action
    page_pixels: int = 4_000_000  # a larger page is rendered at a lower resolution instead
    image_pixels: int = 40_000_000  # a larger picture is not decoded at all (a pixel bomb)
    attachment_size: int = 30 * 1024 * 1024
    archive_depth: int = 3  # ZIPs inside ZIPs looked into for encryption
    archive_bytes: int = 100 * 1024 * 1024  # decompressed while looking into nested archives
    cpu: float = 60.0  # seconds of CPU for one conversion
    wall: float = 120.0  # seconds of wall time for one conversion
    memory: int = 2 * 1024 * 1024 * 1024  # address space of one conversion (LibreOffice too)
    processes: int = 256  # processes and threads of one conversion (RLIMIT_NPROC)


@dataclass(frozen=True)
class NeutralizeSettings:
    skip_internal: bool = True  # mail from internal networks is never neutralized
    skip_authenticated: bool = True  # nor mail from SMTP-authenticated users
    # From domains whose mail passes untouched when DMARC passes for them (and subdomains).
    trusted_domains: tuple[str, ...] = ()
    treatment: Treatment = field(default_factory=Treatment)
    convert: tuple[Conversion, ...] = ()
    dpi: int = 100
    page_format: str = "auto"  # lossless for text pages, JPEG for photo-like ones
    jpeg_quality: int = 85
    image_format: str = "png"
    limits: Limits = field(default_factory=Limits)
    workers: int = 0  # conversions at once; 0 = one per CPU
    on_failure: str = "tempfail"  # a conversion crashed, hung or went over a limit
    # The converter says the file is not what it claims (a corrupt PDF, a truncated
    # picture, a document LibreOffice cannot load): permanent, so dropped or rejected.
    on_unreadable: str = "drop"
    encrypted_reply: SmtpReply = SmtpReply(
        550, "5.7.1", "Encrypted attachments are not accepted from this sender; "
                      "please share the files another way")
    failure_reply: SmtpReply = SmtpReply(
        451, "4.7.0", "Could not make the attachments safe; please try again later")
    unreadable_reply: SmtpReply = SmtpReply(
        554, "5.6.0", "An attachment could not be read; please send it in another format")
    language: str = "en"  # of the note telling the recipient what was changed
    soffice: str = "soffice"  # LibreOffice's program (found on PATH)
    require_sandbox: bool = True  # refuse to convert when bubblewrap cannot jail the converter

    def treatment_for(self, action: Any) -> Treatment | None:
        """The treatment a rule's action asks for; None for pass."""
        if action == "pass":
            return None
        if isinstance(action, dict):
            return replace(self.treatment, **action)
        return self.treatment


DEFAULT_CONVERT = (
    Conversion(("office",), "flatten"),
    Conversion(("pdf",), "flatten"),
    Conversion(("image",), "image"),
    Conversion(("text",), "keep"),
    Conversion(("*",), "drop"),
)


class _Match(Str):
    def __init__(self) -> None:
        super().__init__(max_len=200)
        self.expected = ("a kind (" + ", ".join(KINDS) + "), an extension like .docx, a MIME "
                         "type, or *")

    def parse(self, text: str) -> str:
        text = text.strip().lower()
        if text in KINDS or text == "*":
            return text
        if text.startswith(".") and len(text) > 1 and "/" not in text:
            return text
        if text.count("/") == 1 and all(text.split("/")):
            return text
        raise ValueError(f"expected {self.expected}")


TREATMENT_FIELDS = {
    "links": Field(Str(LINKS), None,
                   doc="URLs: defang (text defanged, HTML anchors made inert) or keep."),
    "html": Field(Str(HTML), None, doc="HTML parts: sanitize, prefer_text, to_text or keep."),
    "attachments": Field(Str(ATTACHMENTS), None,
                         doc="Attachments: convert (by the convert table), drop or keep."),
    "encrypted": Field(Str(ENCRYPTED), None,
                       doc="Encrypted archives, Office and PDF files (the PPAP pattern): reject "
                           "or drop."),
}
ACTION_SPEC = Either(
    Str(ACTIONS),
    Struct(TREATMENT_FIELDS, build=lambda **kw: {k: v for k, v in kw.items() if v is not None},
           expected="a mapping of actions to switch (links, html, attachments, encrypted)"))

CONVERSION_SPEC = Struct({
    "match": Field(ListOf(_Match(), min_items=1),
                   doc="What the row matches: kinds (office, pdf, image, archive, text, other), "
                       ".ext, type/subtype, type/*, *."),
    "action": Field(Str(CONVERSIONS),
                    doc="flatten (to a flat PDF), image (re-encoded), keep or drop."),
}, build=lambda match, action: Conversion(tuple(match), action),
    expected="a row: match (kinds, extensions, MIME types) and action")

LIMITS_SPEC = Struct({
    "pages": Field(Number(1, 100_000, integer=True), 50,
                   doc="More pages than this: the conversion fails (on_failure)."),
    "page_pixels": Field(Number(10_000, 200_000_000, integer=True), 4_000_000,
                         doc="A larger page is rendered at a lower resolution."),
    "image_pixels": Field(Number(10_000, 1_000_000_000, integer=True), 40_000_000,
                          doc="A larger picture is not decoded at all (a pixel bomb)."),
    "attachment_size": Field(Number(1024, 2**31, integer=True), 30 * 1024 * 1024,
                             doc="Largest attachment converted, in bytes."),
    "archive_depth": Field(Number(0, 20, integer=True), 3,
                           doc="ZIPs inside ZIPs looked into for encryption."),
    "archive_bytes": Field(Number(0, 2**32, integer=True), 100 * 1024 * 1024,
                           doc="Bytes decompressed while looking into nested archives."),
    "cpu": Field(Duration(minimum=1), 60.0, doc="CPU time of one conversion."),
    "wall": Field(Duration(minimum=1), 120.0, doc="Wall time of one conversion."),
    "memory": Field(Number(64 * 1024 * 1024, 2**40, integer=True), 2 * 1024 * 1024 * 1024,
                    doc="Address space of one conversion, in bytes (LibreOffice too)."),
    "processes": Field(Number(8, 100_000, integer=True), 256,
                       doc="Processes and threads of one conversion (RLIMIT_NPROC)."),
}, build=Limits, expected="limits: pages, page_pixels, image_pixels, attachment_size, "
                          "archive_depth, archive_bytes, cpu, wall, memory, processes")


def _settings(trusted_domains: list[str], convert: list[Conversion], links: str | None,
              html: str | None, attachments: str | None, encrypted: str | None,
              **kw: Any) -> NeutralizeSettings:
    switches = {"links": links, "html": html, "attachments": attachments,
                "encrypted": encrypted}
    treatment = replace(Treatment(), **{k: v for k, v in switches.items() if v is not None})
    return NeutralizeSettings(trusted_domains=tuple(d.lower().lstrip("@").rstrip(".")
                                                    for d in trusted_domains),
                              treatment=treatment, convert=tuple(convert) or DEFAULT_CONVERT,
                              **kw)


SETTINGS_SPEC = Struct({
    "skip_internal": Field(Bool(), True, doc="Mail from internal networks is never neutralized."),
    "skip_authenticated": Field(Bool(), True,
                                doc="Mail from SMTP-authenticated users is never neutralized."),
    "trusted_domains": Field(ListOf(Str(max_len=253)), (),
                             doc="From domains whose mail passes untouched when DMARC passes for "
                                 "them (and subdomains)."),
    **TREATMENT_FIELDS,
    "convert": Field(ListOf(CONVERSION_SPEC), (),
                     doc="The conversion table; the first row matching an attachment decides. [] "
                         "= office and pdf flattened, images re-encoded, text kept, the rest "
                         "dropped."),
    "dpi": Field(Number(36, 300, integer=True), 100, doc="Resolution of flattened pages."),
    "page_format": Field(Str(PAGE_FORMATS), "auto",
                         doc="auto (lossless for text pages, JPEG for photo-like ones), jpeg or "
                             "lossless."),
    "jpeg_quality": Field(Number(20, 95, integer=True), 85,
                          doc="JPEG quality of flattened pages."),
    "image_format": Field(Str(IMAGE_FORMATS), "png",
                          doc="Format of re-encoded images: png or jpeg."),
    "limits": Field(LIMITS_SPEC, factory=Limits, doc="Resource limits of one conversion."),
    "workers": Field(Number(0, 64, integer=True), 0, doc="Conversions at once; 0 = one per CPU."),
    "on_failure": Field(Str(ON_FAILURE), "tempfail",
                        doc="A conversion crashed, hung or went over a limit: tempfail, drop or "
                            "reject."),
    "on_unreadable": Field(Str(ON_UNREADABLE), "drop",
                           doc="The file is not what it claims (corrupt, truncated): drop or "
                               "reject."),
    "unreadable_reply": Field(Reply("5"), NeutralizeSettings.unreadable_reply,
                              doc="The reply when on_unreadable is reject."),
    "encrypted_reply": Field(Reply("5"), NeutralizeSettings.encrypted_reply,
                             doc="The reply when encrypted is reject."),
    "failure_reply": Field(Reply("4"), NeutralizeSettings.failure_reply,
                           doc="The reply when on_failure is tempfail."),
    "language": Field(Str(LANGUAGES), "en",
                      doc="Language of the note telling the recipient what was changed: ja or "
                          "en."),
    "soffice": Field(Str(max_len=1000), "soffice", doc="LibreOffice's program (found on PATH)."),
    "require_sandbox": Field(Bool(), True,
                             doc="Refuse to convert when bubblewrap cannot jail the converter."),
}, build=_settings, expected="the neutralize settings")


@dataclass(frozen=True)
class NeutralizeExpectation:
    action: str | None = None  # neutralize | pass
    rule: str | None = None


EXPECT_SPEC = Struct({
    "action": Field(Str(ACTIONS), None, doc="The expected action: neutralize or pass."),
    "rule": Field(Str(), None, doc="The rule expected to decide; (defaults) when none does."),
}, build=NeutralizeExpectation, expected="expectations: action, rule")
