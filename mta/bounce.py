"""RFC 3464 delivery status notifications (bounces): multipart/report with a human part,
a message/delivery-status part and the original headers."""
from __future__ import annotations

from email.message import EmailMessage, Message
from datetime import datetime, timezone
from email.utils import format_datetime, make_msgid

from .edits_apply import split_message
from .queue import Envelope, RecipientState


def _status_code(reply: str | None) -> str:
    """The enhanced status code in a reply, else a generic permanent failure."""
    parts = (reply or "").split()
    if len(parts) > 1 and parts[1][:1] in "45" and parts[1].count(".") == 2:
        return parts[1]
    return "5.0.0"


def build_bounce(envelope: Envelope, original: bytes, failed: list[RecipientState],
                 hostname: str, reason: str) -> bytes:
    """The bounce for `failed` recipients of a message, to its sender."""
    report = EmailMessage()
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = envelope.sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(datetime.now(timezone.utc))
    report["Message-ID"] = make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")
    lines = [f"This is the mail system at host {hostname}.", "",
             "Your message could not be delivered to these recipients:", ""]
    lines += [f"  <{r.address}>: {r.last_reply or reason}" for r in failed]
    human = EmailMessage()
    human.set_content("\n".join(lines) + "\n")
    # message/delivery-status is a list of header blocks: one per message, one per recipient.
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Mailmoat-Queue-ID"] = envelope.queue_id
    per_message["Arrival-Date"] = format_datetime(
        datetime.fromtimestamp(envelope.received_at, timezone.utc))
    blocks = [per_message]
    for rcpt in failed:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {rcpt.address}"
        block["Action"] = "failed"
        block["Status"] = _status_code(rcpt.last_reply)
        block["Diagnostic-Code"] = f"smtp; {rcpt.last_reply or reason}"
        blocks.append(block)
    status = EmailMessage()
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(blocks)
    headers = EmailMessage()
    fields, _ = split_message(original)
    headers.set_content(b"".join(fields), maintype="text", subtype="rfc822-headers", cte="8bit")
    report.attach(human)
    report.attach(status)
    report.attach(headers)
    return report.as_bytes(policy=report.policy.clone(linesep="\r\n"))

