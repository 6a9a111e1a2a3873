"""Attachments as find_attachments sees them, paired with their byte ranges in the raw
message, so a milter can decode, remove or replace them without a full parse.

Files encoded inside text parts (uuencode, yEnc, BinHex) are attachments too: each is a
pseudo part whose range is its block of text (see embedded.py)."""
from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage
from typing import Iterator

from . import embedded, stream
from .parts import Attachment, content_type, find_attachments
from .scan import Part, Raw, parts_by_skeleton, scan


@dataclass
class Found:
    root: Part
    attachments: list[Attachment]
    parts: list[Part]  # parts[i] is the range of attachments[i]


def locate_attachments(raw: Raw, *, inline_images: bool = False,
                       root: Part | None = None) -> Found:
    """`root`: the message scanned already. `raw` must have CRLF line ends (Message.raw)."""
    root = root if root is not None else scan(raw)
    attachments = find_attachments(root.skeleton, inline_images=inline_images)
    by_skeleton = parts_by_skeleton(root)
    pairs = [(a, by_skeleton[id(a.part)]) for a in attachments]
    taken = {id(part) for _, part in pairs}
    for part in _text_leaves(root):
        if id(part) in taken:  # a text file as a whole: its blocks go with it
            continue
        if embedded.encoded_text_holds_file(raw, part, stream.decoded(raw, part)):
            # The blocks cannot be cut out of base64 text: the whole part goes (fail closed).
            pairs.append((_whole(raw, part), part))
            continue
        for pseudo in embedded.find_embedded(raw, part):
            data = b"".join(stream.decoded(raw, pseudo))
            pairs.append((Attachment(part=pseudo.skeleton, filename=_name(pseudo.skeleton),
                                     content_type=content_type(pseudo.skeleton), data=data,
                                     size=len(data)), pseudo))
    pairs.sort(key=lambda pair: pair[1].start)
    return Found(root, [a for a, _ in pairs], [part for _, part in pairs])


def _whole(raw: Raw, part: Part) -> Attachment:
    data = b"".join(stream.decoded(raw, part))
    return Attachment(part=part.skeleton, filename="", content_type=content_type(part.skeleton),
                      data=data, size=len(data))


def _text_leaves(root: Part) -> Iterator[Part]:
    stack = [root]
    while stack:
        part = stack.pop()
        if part.children:
            stack.extend(reversed(part.children))
        elif content_type(part.skeleton).startswith("text/"):
            yield part


def _name(skeleton: EmailMessage) -> str:
    return str(skeleton.get_param("filename", "", header="Content-Disposition") or "")


