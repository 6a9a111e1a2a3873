"""Writing small MIME parts (notes, the ZIP part's header section) the way the rest of the
message is written: CRLF line ends, headers never re-folded."""
from __future__ import annotations

import io
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage

POLICY = email_policy.default.clone(linesep="\r\n", refold_source="none")


def to_bytes(message: EmailMessage) -> bytes:
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=POLICY).flatten(message)
    return out.getvalue()


def file_part_header(filename: str, content_type: str) -> bytes:
    """The header section of a base64 file part, the name encoded as RFC 2231 asks when it
    is not ASCII (and as Content-Type's name too, for old clients)."""
    part = EmailMessage(policy=POLICY)
    part.add_header("Content-Type", content_type, name=filename)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    part["Content-Transfer-Encoding"] = "base64"
    head = to_bytes(part)
    return head[:head.index(b"\r\n\r\n") + 4]
