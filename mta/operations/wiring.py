"""Operations built from a gateway config, for the CLI and the console process."""
from __future__ import annotations

import importlib

from milters.core.config import GatewayConfig

from mta.queue.spool import Queue

from .core import AuditLike, Operations


def open_audit(config: GatewayConfig) -> AuditLike | None:
    """The configured audit log (milters/core/audit, the `audit:` block); None while that
    package is not part of this build (actions are then logged, not audited)."""
    try:
        module = importlib.import_module("milters.core.audit")
    except ModuleNotFoundError as exc:
        if exc.name not in ("milters.core.audit",):
            raise
        return None
    return module.open_audit_log(config)  # type: ignore[no-any-return]


def operations_for(config: GatewayConfig) -> Operations:
    return Operations(Queue(config.queue.dir), open_audit(config))
