"""One copy of a message, treated: attachments into one encrypted ZIP (with a note that a
password follows), offloaded to Nextcloud (a note with the link in their place), or removed
(with a list of what was removed)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path

from .names import cap_length, entry_names, safe_name, unique_names
from .nextcloud import (NextcloudClient, NextcloudError, expiry_for, load_app_password,
                        message_folder)
from .notice import format_files, format_links, load_template, note_part
from .parts import Attachment, find_attachments
from .rebuild import POLICY, append_parts, parse, remove_parts
from .settings import AttachmentsSettings
from .zipper import ZipEntry, write_zip

SPOOL_IN_MEMORY = 1024 * 1024  # ZIPs above this go to a temporary file while written


@dataclass
class Treated:
    message: EmailMessage
    files: list[str] = field(default_factory=list)  # the attachments' names, as the user saw
    zip_name: str = ""  # the ZIP's name; for offload, the files' names
    expires: str = ""  # offload: the last day the link works


def _templates(settings: AttachmentsSettings) -> Path | None:
    return Path(settings.notice.templates) if settings.notice.templates else None


def display_names(attachments: list[Attachment]) -> list[str]:
    return [a.filename or ("message.eml" if a.is_message else f"attachment{n}")
            for n, a in enumerate(attachments, 1)]


def zip_part(data: bytes, zip_name: str) -> EmailMessage:
    part = EmailMessage(policy=POLICY)
    part.set_content(data, maintype="application", subtype="zip", filename=zip_name,
                     disposition="attachment")
    return part


def encrypt(raw: bytes, settings: AttachmentsSettings, password: str, now: datetime,
            sender: str) -> Treated | None:
    """All attachments into one ZIP; None when the message has none."""
    message = parse(raw)
    attachments = find_attachments(message, inline_images=settings.inline_images)
    if not attachments:
        return None
    enc = settings.encrypt
    shown = display_names(attachments)
    names = entry_names(shown, enc.names, enc.alias)
    mtime = now.timestamp()
    zip_name = now.strftime(enc.zip_name)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as out:
        write_zip(out, [ZipEntry(name, a.data, mtime) for name, a in zip(names, attachments)],
                  password=password, encryption=enc.encryption, charset=enc.names)
        out.seek(0)
        data = out.read()
    note = note_part(load_template("encrypted-note", settings.notice.language,
                                   _templates(settings)),
                     {"filename": zip_name, "sender": sender})
    remove_parts(message, [a.part for a in attachments])
    append_parts(message, [note, zip_part(data, zip_name)])
    return Treated(message, shown, zip_name)


def delete(raw: bytes, settings: AttachmentsSettings, sender: str) -> Treated | None:
    """Attachments removed, with a note listing them; None when the message has none."""
    message = parse(raw)
    attachments = find_attachments(message, inline_images=settings.inline_images)
    if not attachments:
        return None
    shown = display_names(attachments)
    files = format_files((name, a.content_type, a.size) for name, a in zip(shown, attachments))
    note = note_part(load_template("deleted-note", settings.notice.language,
                                   _templates(settings)), {"files": files, "sender": sender})
    remove_parts(message, [a.part for a in attachments])
    append_parts(message, [note])
    return Treated(message, shown)


def offload(raw: bytes, settings: AttachmentsSettings, password: str, now: datetime,
            sender: str, message_id: str) -> Treated | None:
    """Attachments uploaded to Nextcloud and shared with `password` until an explicit date;
    in the message, a note with the link in their place. None when there are none.
    Raises NextcloudError (the caller applies offload.on_failure) and ConfigError."""
    nextcloud = settings.offload.nextcloud
    if nextcloud is None:
        raise NextcloudError("offload chosen, but the policy has no offload.nextcloud "
                             "settings", transient=False)
    message = parse(raw)
    attachments = find_attachments(message, inline_images=settings.inline_images)
    if not attachments:
        return None
    shown = display_names(attachments)
    names = unique_names([cap_length(safe_name(name)) for name in shown])
    folder = message_folder(nextcloud.folder, sender, message_id or now.strftime("%H%M%S"),
                            now.date())
    expire = expiry_for(nextcloud, now.date())
    with NextcloudClient(nextcloud, load_app_password(nextcloud)) as client:
        shares = client.upload_and_share([(n, a.data) for n, a in zip(names, attachments)],
                                         folder, password, expire)
    links = format_links((share.name, share.url) for share in shares)
    note = note_part(load_template("offload-note", settings.notice.language,
                                   _templates(settings)),
                     {"links": links, "expires": expire.isoformat(), "sender": sender})
    remove_parts(message, [a.part for a in attachments])
    append_parts(message, [note])
    return Treated(message, shown, zip_name=", ".join(names), expires=expire.isoformat())
