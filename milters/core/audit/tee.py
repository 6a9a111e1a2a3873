"""The tee: story events logged by any process become audit records.

A logging handler beside the line handler: an event in AUDITED that carries a queue_id is
appended to the audit log (buffered; see base.py). Milters need no import of mta and no
call of their own: their log_event() lines are the source. Installed once a process knows
its config (`install_tee`), by serve (the smtpd and the chain), the delivery process, each
`mailmoat milter`, and `scan --live-state`.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import TYPE_CHECKING

from .base import AuditLog

if TYPE_CHECKING:
    from ..config import GatewayConfig

# The story of a message, from where each event is logged:
AUDITED = frozenset({
    # smtpd and serve's milter chain
    "queued", "reject", "discarded", "milter_verdict", "milter_passed", "header_ended_early",
    # each milter's own verdict and edits
    "verdict", "points", "attachments", "attachments_failed", "attachments_unparsable",
    "offload_failed", "neutralized", "converted", "neutralize_refused", "signed", "sealed",
    # delivery
    "delivered", "deferred", "bounced", "expired", "removed",
})
# The console's own events (mta/console): who logged in, failed, was throttled, logged out
# or was refused an action, and from where. They name no message: recorded without one.
ACCESS_EVENTS = frozenset({"console_login", "console_login_failed", "console_login_throttled",
                           "console_logout", "console_csrf_refused", "console_action_refused"})
# Not here: held, released, deleted and downloaded are appended by the operations themselves
# (mta/operations), with the console user or CLI user as actor; a tee would add them twice.
# What a record is called when its log event's name says less than its action: the story
# (and the overview's counts, which go by event) read "encrypted", not "attachments".
RENAMED = {("attachments", "encrypt"): "encrypted", ("attachments", "offload"): "offloaded",
           ("attachments", "delete"): "attachments_deleted"}
PURGE_EVERY = 3600.0  # seconds between retention purges (in the delivery process only)
_LOGGER = "mailmoat"


class AuditTee(logging.Handler):
    def __init__(self, log: AuditLog, program: str) -> None:
        super().__init__(logging.INFO)
        self.log = log
        self.program = program

    def createLock(self) -> None:  # noqa: N802 (logging's name): append has its own lock
        self.lock = None  # type: ignore[assignment]

    def handle(self, record: logging.LogRecord) -> bool:  # no filters, no handler lock
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        message = record.msg
        event = getattr(message, "event", None)
        access = event in ACCESS_EVENTS
        if event not in AUDITED and not access:
            return
        fields = dict(message.fields)
        queue_id = fields.pop("queue_id", None)
        if queue_id is None and not access:
            return
        try:
            message_id = fields.pop("message_id", None)
            source = fields.pop("source", None) or fields.pop("ip", None)
            actor = fields.pop("actor", None) or (
                f"console:{fields.pop('name')}" if access and fields.get("name") else
                f"mailmoat/{fields.get('milter') or self.program}")
            event = RENAMED.get((event, fields.get("action")), event)
            self.log.append(event, queue_id=queue_id, message_id=message_id, actor=actor,
                            source=source, now=record.created, **fields)
        except Exception:  # the audit log must never take a milter down
            self.handleError(record)


def install_tee(config: "GatewayConfig", program: str, *, purge: bool = False
                ) -> AuditLog | None:
    """Tee this process's story events into the config's audit log (written at exit too).
    `purge`: also purge past the retention every PURGE_EVERY (one process per gateway)."""
    if not config.audit.enabled:
        return None
    from . import open_audit_log

    logger = logging.getLogger(_LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, AuditTee):  # installed again (a reload): the newer wins
            logger.removeHandler(handler)
            handler.log.close()
    log = open_audit_log(config)
    logger.addHandler(AuditTee(log, program))
    atexit.register(_close_quietly, log)
    if purge and config.audit.retention > 0:
        threading.Thread(target=_purge_loop, args=(log, config.audit.retention),
                         name="audit-purge", daemon=True).start()
    return log


def _close_quietly(log: AuditLog) -> None:
    try:
        log.close()
    except Exception as exc:  # at exit: say what was lost, never a traceback
        from ..eventlog import log_event
        log_event("audit_write_failed", level=logging.ERROR, error=str(exc)[:300],
                  waiting="lost at exit")


def purge_expired(log: AuditLog, retention: float, now: float | None = None) -> int:
    """Purge past `retention` seconds (0: keep forever); how many records went."""
    if retention <= 0:
        return 0
    removed = log.purge((time.time() if now is None else now) - retention)
    if removed:
        from ..eventlog import log_event
        log_event("audit_purged", records=removed, retention=retention)
    return removed


def _purge_loop(log: AuditLog, retention: float) -> None:
    from ..eventlog import log_event

    while True:
        try:
            purge_expired(log, retention)
        except Exception as exc:  # the store is down: next time
            log_event("audit_write_failed", level=logging.ERROR, error=str(exc)[:300],
                      waiting="purge")
        time.sleep(PURGE_EVERY)
