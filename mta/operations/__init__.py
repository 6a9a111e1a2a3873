"""Operations on held mail and the audit log, shared by the CLI, the JSON API and the
console page (issue 17). Import from here."""
from __future__ import annotations

from .access import ActorLike, Forbidden, NotFound, OperationError, cli_actor
from .core import ActionResult, AuditLike, Operations
from .held import HeldItem, HeldPage
from .overview import Overview, Source
from .view import AttachmentInfo, MessageView, TextPart

__all__ = ["ActorLike", "Forbidden", "NotFound", "OperationError", "cli_actor",
           "ActionResult", "AuditLike", "Operations", "HeldItem", "HeldPage", "Overview",
           "Source", "AttachmentInfo", "MessageView", "TextPart"]
