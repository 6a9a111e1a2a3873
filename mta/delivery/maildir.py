"""Maildir delivery for local use and tests: one Maildir per recipient address."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from mta.queue.spool import StoredMessage

from .agent import DEFERRED, DELIVERED, NO_OPTIONS, DeliveryOptions, Outcome
from .maildir_names import header_text, mailbox_name


@dataclass(frozen=True)
class MaildirDelivery:
    """One Maildir per recipient address under `root` (local use and tests), named by
    mta/delivery/maildir_names.py so that no address can reach outside `root`."""

    root: Path

    def deliver(self, sender: str, recipients: list[str], message: StoredMessage,
                options: DeliveryOptions = NO_OPTIONS) -> dict[str, Outcome]:
        outcomes = {}
        for rcpt in recipients:
            try:
                name = self._store(rcpt, sender, message)
                outcomes[rcpt] = Outcome(DELIVERED, f"250 2.0.0 delivered to maildir as {name}")
            except OSError as exc:
                outcomes[rcpt] = Outcome(DEFERRED, f"451 4.3.0 maildir: {exc.strerror or exc}")
        return outcomes

    def close_idle(self, everything: bool = False) -> None:
        return None  # nothing is kept open

    def _store(self, rcpt: str, sender: str, message: StoredMessage) -> str:
        box = self.root / mailbox_name(rcpt)
        if box.parent != self.root:  # mailbox_name makes one component; fail closed anyway
            raise OSError(f"mailbox name for {rcpt!r} is not one path component")
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}.P{os.getpid()}.{socket.gethostname()}"
        tmp = box / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out, open(message.path, "rb") as source:
                out.write(f"Return-Path: <{header_text(sender)}>\r\n"
                          f"Delivered-To: {header_text(rcpt)}\r\n".encode("utf-8",
                                                                          "surrogateescape"))
                left = message.size
                while left > 0:
                    block = source.read(min(left, 1 << 20))
                    if not block:
                        break
                    out.write(block)
                    left -= len(block)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, box / "new" / name)
        return name
