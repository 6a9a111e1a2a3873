"""The audit log: each message's story, hash-chained, kept where the Store is.

    log = open_audit_log(config)
    log.append("released", queue_id="4F2A1", actor="console:alice", source="192.0.2.9")
    log.flush()
    log.verify().ok

Backends: SQLite (a file beside the store's, or `audit.file`), Redis (when the store is redis://:
several gateways share one chain), memory (memory:// stores: tests, scan's throwaway state).
The tee (tee.py) turns the story events of every process into records.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StoreError
from .base import FLUSH_AT, FLUSH_EVERY, Anchor, AuditLog, VerifyResult
from .memory_log import MemoryAuditLog
from .record import GENESIS, AuditRecord, canonical, chain_hash
from .sqlite_log import SqliteAuditLog

if TYPE_CHECKING:
    from ..config import GatewayConfig

__all__ = ["FLUSH_AT", "FLUSH_EVERY", "GENESIS", "Anchor", "AuditLog", "AuditRecord",
           "MemoryAuditLog", "SqliteAuditLog", "VerifyResult", "canonical", "chain_hash",
           "open_audit_log"]


def open_audit_log(config: "GatewayConfig", *, create: bool = True) -> AuditLog:
    """The audit log the config's `store:` and `audit:` name (no connection made yet).
    create=False (the commands that read it): a SQLite file that is not there is an
    error, not a new empty log that would pass for an intact one."""
    store = config.store
    if store == "memory://":
        return MemoryAuditLog()
    path = None
    if config.audit.file is not None:
        path = Path(config.audit.file)
    elif store.startswith("sqlite:///"):
        path = beside_store(store[len("sqlite:///"):])
    if path is not None:
        if not create and not path.exists():
            raise StoreError(f"no audit log at {path} (nothing recorded yet, or it was "
                             "removed)")
        return SqliteAuditLog(str(path))
    if store.startswith(("redis://", "rediss://")):
        return _open_redis(config)
    raise StoreError(f"the audit log cannot be kept in store {store.split(':')[0]}:")


def beside_store(store_path: str) -> Path:
    """The audit log's own file next to the store's (state.db -> state-audit.db): its
    batches then never hold the write lock the rate limiter waits on for each message."""
    path = Path(store_path)
    return path.with_name(f"{path.stem}-audit{path.suffix or '.db'}")


def _open_redis(config: "GatewayConfig") -> AuditLog:
    from ..store import redis_client
    from .redis_log import RedisAuditLog

    client, where = redis_client(config, "audit log", retry_once=True)
    return RedisAuditLog(client, where)