"""Attachments as find_attachments sees them, paired with their byte ranges in the raw
message, so a milter can decode, remove or replace them without a full parse."""
from __future__ import annotations

from dataclasses import dataclass

from .parts import Attachment, find_attachments
from .scan import Part, Raw, parts_by_skeleton, scan


@dataclass
class Found:
    root: Part
    attachments: list[Attachment]
    parts: list[Part]  # parts[i] is the range of attachments[i]


def locate_attachments(raw: Raw, *, inline_images: bool = False,
                       root: Part | None = None) -> Found:
    """`root`: the message scanned already."""
    root = root if root is not None else scan(raw)
    attachments = find_attachments(root.skeleton, inline_images=inline_images)
    by_skeleton = parts_by_skeleton(root)
    return Found(root, attachments, [by_skeleton[id(a.part)] for a in attachments])
