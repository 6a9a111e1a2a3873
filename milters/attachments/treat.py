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
from datetime import datetime
from pathlib import Path
from typing import Iterator

from milters.core.mime.locate import Found, locate_attachments
from milters.core.mime.names import cap_length, entry_names, safe_name, unique_names
from milters.core.mime.parts import Attachment
from milters.core.mime.scan import Raw
from milters.core.mime.stream import (NewPart, Rebuilt, base64_lines, decode_to_file, decoded,
                                      rebuild, spool)
from milters.core.mime.write import file_part_header, to_bytes
from .nextcloud import (NextcloudClient, NextcloudError, expiry_for, load_app_password,
                        message_folder)
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


class TooLarge(Exception):
    """The attachments decode to more than max_total_size bytes."""


def find(raw: Raw, settings: AttachmentsSettings) -> Found | None:
    found = locate_attachments(raw, inline_images=settings.inline_images)
    return found if found.attachments else None


def check_total_size(raw: Raw, settings: AttachmentsSettings) -> None:
    """TooLarge when the attachments decode to more than max_total_size bytes, before any
    ZIP or upload starts. A transfer encoding never decodes to more bytes than it takes, so
    only a message whose encoded attachments are over the limit is decoded (and counted,
    stopping at the limit) to find out."""
    found = find(raw, settings)
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


def encrypt(raw: Raw, settings: AttachmentsSettings, password: str, now: datetime,
            sender: str) -> Treated | None:
    """All attachments into one ZIP; None when the message has none."""
    found = find(raw, settings)
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


def delete(raw: Raw, settings: AttachmentsSettings, sender: str) -> Treated | None:
    """Attachments removed, with a note listing them; None when the message has none."""
    found = find(raw, settings)
    if found is None:
        return None
    shown = display_names(found.attachments)
    sizes = [sum(len(chunk) for chunk in decoded(raw, part)) for part in found.parts]
    files = format_files((name, a.content_type, size)
                         for name, a, size in zip(shown, found.attachments, sizes))
    note = _note(settings, "deleted-note", {"files": files, "sender": sender})
    return Treated(rebuild(raw, found.root, found.parts, [note]), shown)


def offload(raw: Raw, settings: AttachmentsSettings, password: str, now: datetime,
            sender: str, message_id: str) -> Treated | None:
    """Attachments uploaded to Nextcloud and shared with `password` until an explicit date;
    in the message, a note with the link in their place. None when there are none.
    Raises NextcloudError (the caller applies offload.on_failure) and ConfigError."""
    nextcloud = settings.offload.nextcloud
    if nextcloud is None:
        raise NextcloudError("offload chosen, but the policy has no offload.nextcloud "
                             "settings", transient=False)
    found = find(raw, settings)
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
