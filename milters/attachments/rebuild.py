"""Taking attachments out of a parsed message and putting new parts in, keeping everything
else as it came (headers unfolded and re-folded by nobody, untouched parts byte for byte),
and turning the result into milter edits or a whole message for re-injection."""
from __future__ import annotations

import io
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage

from milters.core.edits import AddHeader, ChangeHeader, Edit, ReplaceBody
from milters.core.message import parse_bytes

# Parse and write back without re-folding headers that came from the message.
POLICY = email_policy.default.clone(linesep="\r\n", refold_source="none")
MIME_HEADERS = ("MIME-Version", "Content-Type", "Content-Transfer-Encoding")


def parse(raw: bytes) -> EmailMessage:
    return parse_bytes(raw, POLICY)


def remove_parts(root: EmailMessage, doomed: list[EmailMessage]) -> None:
    """Take each of `doomed` out of whichever multipart holds it."""
    ids = {id(part) for part in doomed}
    for container in root.walk():
        if container.is_multipart():
            payload = container.get_payload()
            if isinstance(payload, list) and any(id(p) in ids for p in payload):
                container.set_payload([p for p in payload if id(p) not in ids])


def _clear_mime_headers(message: EmailMessage) -> None:
    for name in ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition"):
        del message[name]


def append_parts(root: EmailMessage, parts: list[EmailMessage]) -> None:
    """Add `parts` after the message's content: into a top-level multipart/mixed, or into a
    new multipart/mixed that holds the old content as its first part."""
    if root.get_content_type() == "multipart/mixed" and isinstance(root.get_payload(), list):
        for part in parts:
            root.attach(part)
        return
    body = EmailMessage(policy=POLICY)
    for name in ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition"):
        if name in root:
            body[name] = root[name]
    if root.is_multipart():
        body.set_payload(root.get_payload())
    else:
        body.set_payload(root.get_payload(decode=False))
    _clear_mime_headers(root)
    root["Content-Type"] = "multipart/mixed"
    root.set_payload([body] if _has_content(body) else [])
    if "MIME-Version" not in root:
        root["MIME-Version"] = "1.0"
    for part in parts:
        root.attach(part)


def _has_content(part: EmailMessage) -> bool:
    payload = part.get_payload()
    return bool(payload) if not isinstance(payload, list) else len(payload) > 0


def to_bytes(message: EmailMessage) -> bytes:
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=POLICY).flatten(message)
    return out.getvalue()


def body_of(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw[end + 4:] if end >= 0 else b""


def edits_between(original: EmailMessage, changed: EmailMessage) -> list[Edit]:
    """The milter edits that turn `original` into `changed`: the MIME headers that differ
    and the new body (the other headers are never touched here)."""
    edits: list[Edit] = []
    for name in MIME_HEADERS:
        before, after = original.get(name), changed.get(name)
        if before is not None and after is None:
            edits.append(ChangeHeader(name, 1, ""))
        elif after is not None and str(after) != str(before):
            value = str(after)
            edits.append(ChangeHeader(name, 1, value) if before is not None
                         else AddHeader(name, value))
    edits.append(ReplaceBody(body_of(to_bytes(changed))))
    return edits
