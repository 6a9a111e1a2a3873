"""One copy of a message, treated: attachments into one encrypted ZIP (with a note that a
password follows), offloaded to Nextcloud (a note with the link in their place), or removed
(with a list of what was removed).

The message is read through core.mime's byte ranges and written back in pieces: the
attachments are decoded into temporary files and the ZIP is written to one, so a large
attachment is never held whole in memory, encoded or decoded.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from datetime import datetime
from pathlib import Path
from typing import Iterator

from milters.core.mime.locate import Found, locate_attachments
from milters.core.mime.names import cap_length, entry_names, safe_name, unique_names
from milters.core.mime.parts import Attachment
from milters.core.mime.scan import Part, Raw
from milters.core.mime.stream import (NewPart, Rebuilt, base64_lines, decode_to_file, decoded,
                                      rebuild, spool)
from milters.core.mime.write import file_part_header, to_bytes
from .nextcloud import (NextcloudClient, NextcloudError, expiry_for, load_app_password,
                        message_folder)
from .certainty import examine
from .notice import format_files, format_links, load_template, note_part
from .settings import AttachmentsSettings
from .zipper import ZipEntry, write_zip


_ZIP_WRITERS = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                  thread_name_prefix="zip")


@dataclass
class Treated:
    rebuilt: Rebuilt
    files: list[str] = field(default_factory=list)  # the attachments' names, as the user saw
    zip_name: str = ""  # the ZIP's name; for offload, the files' names
    expires: str = ""  # offload: the last day the link works


class TooLarge(Exception):
    """The attachments decode to more than max_total_size bytes."""


class Unparsable(Exception):
    """The message's structure cannot be trusted and the policy says tempfail."""


WHOLE_NAME = "original.eml"


@dataclass
class Finding:
    """The parts to treat as attachments, and why some were not certain."""

    found: Found | None  # None: no attachments
    whole: str = ""  # why the whole message is the one attachment ("" = it is not)
    doubted: list[str] = field(default_factory=list)  # leaves taken as files, and why


def find(raw: Raw, settings: AttachmentsSettings) -> Finding:
    """The attachments as the core finds them, plus what certainty.examine cannot vouch
    for: doubted leaves join them; a structure that cannot be trusted makes the whole
    message one attachment, `original.eml` (on_unparsable: encrypt_whole), or raises
    Unparsable (tempfail)."""
    found = locate_attachments(raw, inline_images=settings.inline_images)
    doubts = examine(raw, found.root, found.parts)
    if doubts.uncontainable or (doubts.whole and settings.on_unparsable == "tempfail"):
        raise Unparsable(doubts.whole)
    if doubts.whole or any(part is found.root for part, _ in doubts.parts):
        # The raw bytes as they came: a part without headers or transfer encoding.
        everything = Part(0, 0, len(raw), EmailMessage())
        return Finding(Found(everything, [Attachment(everything.skeleton, WHOLE_NAME,
                                                      "message/rfc822", b"", len(raw),
                                                      is_message=True)], [everything]),
                       whole=doubts.whole or doubts.parts[0][1],
                       doubted=[reason for _, reason in doubts.parts])
    for n, (part, _) in enumerate(doubts.parts, 1):
        found.attachments.append(Attachment(part.skeleton, _doubted_name(part, n),
                                            part.skeleton.get_content_type(), b"",
                                            part.end - part.start))
        # Into the file goes the part as it came, header section included: a broken
        # header or encoding must not make us lose the bytes it was hiding.
        found.parts.append(Part(part.start, part.start, part.end, EmailMessage(),
                                delimiter_at=part.delimiter_at))
    order = sorted(range(len(found.parts)), key=lambda i: found.parts[i].start)
    found.parts = [found.parts[i] for i in order]
    found.attachments = [found.attachments[i] for i in order]
    return Finding(found if found.attachments else None,
                   doubted=[reason for _, reason in doubts.parts])


def _doubted_name(part: Part, n: int) -> str:
    """What the file holds is the part as it came, header section included: a MIME entity,
    which mail clients open as .eml."""
    try:
        name = part.skeleton.get_filename() or ""
    except (ValueError, LookupError, UnicodeError):  # a name the stdlib cannot decode
        name = ""
    return f"{name}.eml" if name else f"part{n}.eml"


def check_total_size(raw: Raw, found: Found | None, settings: AttachmentsSettings) -> None:
    """TooLarge when the attachments decode to more than max_total_size bytes, before any
    ZIP or upload starts. A transfer encoding never decodes to more bytes than it takes, so
    only a message whose encoded attachments are over the limit is decoded (and counted,
    stopping at the limit) to find out."""
    if found is None:
        return
    limit = settings.max_total_size
    if sum(part.end - part.body_start for part in found.parts) <= limit:
        return
    total = 0
    for part in found.parts:
        for chunk in decoded(raw, part):
            total += len(chunk)
            if total > limit:
                raise TooLarge(f"the attachments decode to more than max_total_size "
                               f"({limit} bytes)")


def _templates(settings: AttachmentsSettings) -> Path | None:
    return Path(settings.notice.templates) if settings.notice.templates else None


def display_names(attachments: list[Attachment]) -> list[str]:
    return [a.filename or ("message.eml" if a.is_message else f"attachment{n}")
            for n, a in enumerate(attachments, 1)]


def _note(settings: AttachmentsSettings, kind: str, values: dict[str, str]) -> NewPart:
    part = note_part(load_template(kind, settings.notice.language, _templates(settings)),
                     values)
    return NewPart(to_bytes(part))


def encrypt(raw: Raw, found: Found | None, settings: AttachmentsSettings, password: str,
            now: datetime, sender: str) -> Treated | None:
    """All attachments into one ZIP; None when the message has none."""
    if found is None:
        return None
    enc = settings.encrypt
    shown = display_names(found.attachments)
    names = entry_names(shown, enc.names, enc.alias)
    zip_name = now.strftime(enc.zip_name)
    decoded = [decode_to_file(raw, part) for part in found.parts]
    archive = spool()
    entries = [ZipEntry(name, data, now.timestamp())  # type: ignore[arg-type]
               for name, data in zip(names, decoded)]
    try:
        # libarchive calls back into Python (ctypes) to hand over the ZIP. Such callbacks
        # take the GIL through PyGILState, which must not run on libmilter's threads:
        # pymilter gives them thread states of its own, and the mix crashed the milter
        # under concurrent sessions. A thread Python made writes the ZIP instead.
        _ZIP_WRITERS.submit(write_zip, archive, entries, password=password,
                            encryption=enc.encryption, charset=enc.names).result()
    finally:
        for file in decoded:
            file.close()
    archive.seek(0)
    note = _note(settings, "encrypted-note", {"filename": zip_name, "sender": sender})
    rebuilt = rebuild(raw, found.root, found.parts,
                      [note, NewPart(file_part_header(zip_name, "application/zip"), _closing(archive))])
    return Treated(rebuilt, shown, zip_name)


def _closing(archive: object) -> Iterator[bytes]:
    """The ZIP's base64 lines; the temporary file goes once they are written."""
    try:
        yield from base64_lines(archive)  # type: ignore[arg-type]
    finally:
        archive.close()  # type: ignore[attr-defined]


def delete(raw: Raw, found: Found | None, settings: AttachmentsSettings,
           sender: str) -> Treated | None:
    """Attachments removed, with a note listing them; None when the message has none."""
    if found is None:
        return None
    shown = display_names(found.attachments)
    sizes = [sum(len(chunk) for chunk in decoded(raw, part)) for part in found.parts]
    files = format_files((name, a.content_type, size)
                         for name, a, size in zip(shown, found.attachments, sizes))
    note = _note(settings, "deleted-note", {"files": files, "sender": sender})
    return Treated(rebuild(raw, found.root, found.parts, [note]), shown)


def offload(raw: Raw, found: Found | None, settings: AttachmentsSettings, password: str,
            now: datetime, sender: str, message_id: str) -> Treated | None:
    """Attachments uploaded to Nextcloud and shared with `password` until an explicit date;
    in the message, a note with the link in their place. None when there are none.
    Raises NextcloudError (the caller applies offload.on_failure) and ConfigError."""
    nextcloud = settings.offload.nextcloud
    if nextcloud is None:
        raise NextcloudError("offload chosen, but the policy has no offload.nextcloud "
                             "settings", transient=False)
    if found is None:
        return None
    shown = display_names(found.attachments)
    names = unique_names([cap_length(safe_name(name)) for name in shown])
    folder = message_folder(nextcloud.folder, sender, message_id or now.strftime("%H%M%S"),
                            now.date())
    expire = expiry_for(nextcloud, now.date())
    files = []
    for name, part in zip(names, found.parts):
        with decode_to_file(raw, part) as data:
            files.append((name, data.read()))  # requests sends bytes; one file at a time
    with NextcloudClient(nextcloud, load_app_password(nextcloud)) as client:
        shares = client.upload_and_share(files, folder, password, expire)
    del files
    links = format_links((share.name, share.url) for share in shares)
    note = _note(settings, "offload-note", {"links": links, "expires": expire.isoformat(),
                                            "sender": sender})
    return Treated(rebuild(raw, found.root, found.parts, [note]), shown,
                   zip_name=", ".join(names), expires=expire.isoformat())
