"""Operations built from a gateway config, for the CLI and the console process."""
from __future__ import annotations

from milters.core.audit import open_audit_log
from milters.core.config import GatewayConfig
from milters.core.review import open_review_book
from milters.core.store import Store

from mta.queue.spool import Queue

from .core import Operations


def operations_for(config: GatewayConfig, store: Store | None = None,
                   points_half_life: float | None = None) -> Operations:
    """Operations on the configured queue and audit log (none with `audit: {enabled:
    false}`: the actions are then only logged); `store` (the console's) gives the
    overview its top sources, decayed with the ratelimit policy's `points_half_life`."""
    audit = open_audit_log(config) if config.audit.enabled else None  # off: actions logged
    return Operations(Queue(config.queue.dir), audit, store, points_half_life=points_half_life,
                      review_book=lambda: open_review_book(config))
