"""`mailmoat scan`: one .eml through the gateway's own milter chain, offline.

It starts the configured built-in milters (on sockets of its own, so a running `serve` is
not disturbed), drives the same ChainSession code `serve` uses through connect, HELO, MAIL,
RCPT and the message, and reports each milter's verdict and edits. `--out` writes the
message as the gateway would queue it. The milters keep their state (rate-limit buckets,
DMARC results) in a throwaway store unless `--live-state` is given: a scan from an outside
--client-ip then counts against that client's rate limits in the configured store, as real
mail would.
"""
from __future__ import annotations

import ipaddress
import json
import re
import socket
import tempfile
from dataclasses import asdict, dataclass, field, replace
from email.utils import getaddresses
from pathlib import Path
from typing import Any, Callable

from milters.core.config import GatewayConfig
from milters.core.secrets import SecretSource
from milters.core.edits import Edit, ReplaceBody
from milters.core.message import Message
from milters.core.verdict import Action, Verdict

from mta.chain.edits_apply import Transit
from mta.chain.session import ChainSession, connect_macros, mail_macros, rcpt_macros
from mta.gateway.listener import ThreadedListener
from mta.gateway.serve import LOOPBACK, MilterSupervisor
from mta.queue.spool import Queue, new_queue_id
from mta.smtp_in.header_end import with_header_ended
from mta.smtp_in.server import GatewayHandler, SmtpSettings
from mta.smtp_in.trace import protocol_name, received_header
from .scan_files import copy_name, write_copy


@dataclass
class ScanRequest:
    raw: bytes
    client_ip: str = "127.0.0.1"
    helo: str = "localhost"
    mail_from: str | None = None
    rcpts: list[str] = field(default_factory=list)
    auth_user: str | None = None


def to_crlf(raw: bytes) -> bytes:
    """An .eml on disk usually has LF line ends; SMTP carries CRLF."""
    return re.sub(rb"\r?\n", b"\r\n", raw)


def _describe(edit: Edit) -> dict[str, Any]:
    if isinstance(edit, ReplaceBody) and not isinstance(edit.body, bytes):
        # A new body past 64 KiB went through a file (closed once applied): not shown.
        return {"action": "ReplaceBody", "body": "(a large new body, not shown)"}
    fields = {key: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
              for key, value in asdict(edit).items()}
    return {"action": type(edit).__name__, **fields}


def run_scan(request: ScanRequest, chain: ChainSession, hostname: str = "localhost"
             ) -> tuple[dict[str, Any], Transit]:
    message = Message(request.raw)
    sender = request.mail_from
    if sender is None:
        senders = getaddresses([message.header_text("From") or ""])
        sender = senders[0][1] if senders else ""
    rcpts = request.rcpts or [addr for _, addr in getaddresses(
        [message.header_text(h) or "" for h in ("To", "Cc")]) if addr]
    family = socket.AF_INET6 if ipaddress.ip_address(request.client_ip).version == 6 \
        else socket.AF_INET
    queue_id = new_queue_id()  # what the gateway would have named it
    recipients: dict[str, str] = {}
    # The trace header the gateway adds at DATA, so that milters see what they would see.
    trace = received_header(helo=request.helo, client_ip=request.client_ip, hostname=hostname,
                            queue_id=queue_id,
                            protocol=protocol_name(True, False, request.auth_user is not None),
                            recipients=rcpts)
    transit = Transit(trace + with_header_ended(request.raw), sender, [])
    verdict = chain.connect(f"[{request.client_ip}]", request.client_ip, 25, family,
                            connect_macros(hostname, request.client_ip))
    if not verdict.ends_transaction:
        verdict = chain.helo(request.helo)
    if not verdict.ends_transaction:
        verdict = chain.mail(sender, macros=mail_macros(queue_id, sender, request.auth_user))
    if not verdict.ends_transaction:
        for rcpt in rcpts:
            answer = chain.rcpt(rcpt, macros=rcpt_macros(queue_id, rcpt))
            recipients[rcpt] = "accepted" if not answer.ends_transaction else \
                f"{answer.action.value}: {answer.reply}"
            if not answer.ends_transaction:
                transit.recipients.append((rcpt, None))
        if transit.recipients:
            verdict, transit = chain.message(transit, {"i": queue_id})
        else:
            verdict = Verdict.reject(reason="no recipient accepted")
    chain.close()
    final = "accept" if verdict.action in (Action.CONTINUE, Action.ACCEPT) else verdict.action.value
    report = {
        "queue_id": queue_id,
        "verdict": final,
        "reply": str(verdict.reply) if verdict.reply else ("250 2.0.0 Ok" if final == "accept"
                                                           else None),
        "milters": [{"name": r.name, "verdict": r.verdict, "stage": r.stage, "reply": r.reply,
                     "actions": [_describe(e) for e in r.actions],
                     "details": {"error": r.error} if r.error else {}} for r in chain.results],
        "recipients": recipients,
        "envelope": {"sender": transit.sender,
                     "recipients": [address for address, _ in transit.recipients]},
        "hold": transit.quarantine,
    }
    return report, transit


# Each milter process gets its own empty store, gone when the scan ends.
THROWAWAY_STORE = "memory://"


def with_store(config: GatewayConfig, url: str) -> GatewayConfig:
    """`config` on another store; the configured store's password source goes with it."""
    return replace(config, store=url, store_password=SecretSource())


def scan(config: GatewayConfig, config_path: str | None, request: ScanRequest,
         load_policy: Callable[[Path], Any], reinjected_dir: Path | None = None,
         live_state: bool = False) -> tuple[dict[str, Any], Transit]:
    """`reinjected_dir`: also write what the milters handed back there, one .eml each.
    `live_state`: the milters use the configured store, not a throwaway one."""
    load_policy(config.policy)  # a broken policy is reported before anything starts
    with tempfile.TemporaryDirectory(prefix="mailmoat-scan-") as run_dir:
        Path(run_dir).chmod(0o755)
        # What milters hand back (copies for some recipients, password notices) is caught
        # by a re-injection listener of our own, into a queue in run_dir, and reported.
        capture = Queue(Path(run_dir) / "reinjected")
        settings = SmtpSettings(hostname=config.hostname, internal_networks=LOOPBACK,
                                max_message_size=config.max_message_size,
                                max_recipients=config.max_recipients, loopback_only=True)
        port = _free_loopback_port()
        with ThreadedListener(GatewayHandler(settings, capture, None, None), "127.0.0.1",
                              port):
            supervisor = MilterSupervisor(replace(config, run_dir=Path(run_dir),
                                                  reinject_listen=f"127.0.0.1:{port}"),
                                          config_path,
                                          store=None if live_state else THROWAWAY_STORE)
            try:
                supervisor.start()
                report, transit = run_scan(request, ChainSession(supervisor.members()),
                                           config.hostname)
                transit = transit.in_memory()  # for --out; its temporary files removed
            finally:
                supervisor.stop()
        entries = sorted(capture.entries(), key=lambda e: e.received_at)
        report["reinjected"] = [_reinjected(capture, entry, number, reinjected_dir)
                                for number, entry in enumerate(entries, 1)]
        return report, transit


def _reinjected(queue: Queue, entry: Any, number: int, directory: Path | None
                ) -> dict[str, Any]:
    raw = queue.message(entry.queue_id)
    recipients = [r.address for r in entry.recipients]
    item = {"sender": entry.sender, "recipients": recipients,
            "subject": Message(raw=raw).subject, "bytes": entry.size}
    if directory is not None:
        item["file"] = str(write_copy(directory, copy_name(number, recipients), raw))
    return item


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    print(f"verdict: {report['verdict']}  {report['reply'] or ''}".rstrip())
    for milter in report["milters"]:
        line = f"  {milter['name']}: {milter['verdict']}"
        if milter["reply"]:
            line += f" at {milter['stage']}: {milter['reply']}"
        if milter["actions"]:
            line += f"; {len(milter['actions'])} edit(s): " + ", ".join(
                a["action"] for a in milter["actions"])
        if milter["details"]:
            line += f"; {milter['details']}"
        print(line)
    for rcpt, state in report["recipients"].items():
        print(f"  rcpt {rcpt}: {state}")
    for copy in report.get("reinjected", []):
        print(f"  handed back for {', '.join(copy['recipients'])}: {copy['subject']!r} "
              f"({copy['bytes']:,} bytes)" + (f" -> {copy['file']}" if "file" in copy else ""))
    if report["hold"]:
        print(f"  would be held: {report['hold']}")
