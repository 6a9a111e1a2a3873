"""RFC 3464 delivery status notifications (bounces): multipart/report with a human part,
a message/delivery-status part and the original headers. When an address in it is not
ASCII (SMTPUTF8 mail), RFC 6533's forms: message/global-delivery-status with `utf-8;`
addresses and message/global-headers, written in UTF-8."""
from __future__ import annotations

from email import message_from_bytes
from email.message import EmailMessage, Message
from datetime import datetime, timezone
from email.utils import format_datetime, make_msgid

from mta.chain.edits_apply import split_message
from mta.queue.spool import Envelope, RecipientState


def _status_code(reply: str | None) -> str:
    """The enhanced status code in a reply, else a generic permanent failure."""
    parts = (reply or "").split()
    if len(parts) > 1 and parts[1][:1] in "45" and parts[1].count(".") == 2:
        return parts[1]
    return "5.0.0"


def _global_part(content_type: str, fields: Message, rest: bytes = b"") -> EmailMessage:
    """A message/global-* part in 8bit: `fields`, an empty line, then `rest` as it is. The
    email package writes a message/* part as the one message it holds; `rest` is that
    message's body, in the surrogate form its generator writes back as the bytes."""
    fields.set_payload(rest.decode("ascii", "surrogateescape"))
    part = EmailMessage()
    part["Content-Type"] = content_type
    part["Content-Transfer-Encoding"] = "8bit"
    part.set_payload([fields])
    return part


def build_bounce(envelope: Envelope, original: bytes, failed: list[RecipientState],
                 hostname: str, reason: str) -> bytes:
    """The bounce for `failed` recipients of a message, to its sender."""
    utf8 = not all(address.isascii() for address in
                   [envelope.sender, *(rcpt.address for rcpt in failed)])
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
    fields, _ = split_message(original)
    if utf8:
        for block in blocks[1:]:
            block.replace_header("Final-Recipient", block["Final-Recipient"].replace(
                "rfc822; ", "utf-8; ", 1))
        status = _global_part("message/global-delivery-status", per_message, b"\r\n".join(
            "".join(f"{name}: {value}\r\n" for name, value in block.items()).encode()
            for block in blocks[1:]))
        headers = _global_part("message/global-headers",
                               message_from_bytes(b"".join(fields) + b"\r\n"))
    else:
        status = EmailMessage()
        status["Content-Type"] = "message/delivery-status"
        status.set_payload(blocks)
        headers = EmailMessage()
        headers.set_content(b"".join(fields), maintype="text", subtype="rfc822-headers",
                            cte="8bit")
    report.attach(human)
    report.attach(status)
    report.attach(headers)
    return report.as_bytes(policy=report.policy.clone(linesep="\r\n", utf8=utf8))

