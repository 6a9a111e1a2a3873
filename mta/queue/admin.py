"""`mailmoat queue list|show|flush|delete|hold|release`: the queue as an admin sees it,
in the spirit of Postfix's `postqueue -p` and `postcat -q`."""
from __future__ import annotations

import json
import time
from dataclasses import asdict

from .spool import Envelope


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(stamp))


def list_lines(entries: list[Envelope]) -> list[str]:
    """`entries`: what the caller may see (mta/operations checks who that is)."""
    if not entries:
        return ["the queue is empty"]
    lines = [f"{'QUEUE ID':<20}  {'SIZE':>8}  {'ARRIVED':<20}  SENDER / RECIPIENTS"]
    for env in entries:
        flag = "!" if env.hold_reason else " "
        lines.append(f"{env.queue_id:<20}{flag} {env.size:>8}  {_when(env.received_at):<20}  "
                     f"<{env.sender}>")
        if env.hold_reason:
            lines.append(f"{'':<54}(held: {env.hold_reason})")
        for rcpt in env.recipients:
            note = rcpt.status + (f": {rcpt.last_reply}" if rcpt.last_reply else "")
            lines.append(f"{'':<54}{rcpt.address} ({note})")
    held = sum(1 for env in entries if env.hold_reason)
    lines.append(f"-- {len(entries)} message(s), {held} held (marked !)")
    return lines


def show_text(envelope: Envelope, raw: bytes) -> str:
    shown = json.dumps(asdict(envelope), indent=2, sort_keys=True)
    message = raw.decode("utf-8", "replace")
    return f"*** ENVELOPE ***\n{shown}\n*** MESSAGE ***\n{message}"
