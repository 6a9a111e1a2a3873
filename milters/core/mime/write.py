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
