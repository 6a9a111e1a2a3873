"""Shared state for rate limiting: one interface, three backends.

    store = open_store("sqlite:///./var/state.db")
    result = store.bucket_take("ip:192.0.2.1", cost=1, rate=0.5, capacity=20, now=time.time())

See base.Store for the semantics; FallbackStore serves from a local store
while Redis is unreachable.
"""
from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from typing import TYPE_CHECKING

from milters.core.errors import StoreError, StoreUnavailable
from milters.core.secrets import read_secret

from .base import POINTS_EPSILON, Admission, BucketResult, Record, Store, Take
from .fallback import FallbackStore
from .memory import MemoryStore
from .sqlite import SqliteStore

if TYPE_CHECKING:
    import redis

    from milters.core.config import GatewayConfig

__all__ = [
    "POINTS_EPSILON",
    "Admission",
    "BucketResult",
    "FallbackStore",
    "MemoryStore",
    "Record",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Take",
    "open_gateway_store",
    "open_store",
]

PASSWORD_ENV = "MAILMOAT_REDIS_PASSWORD"

ACCEPTED_FORMS = (
    "memory://",
    "sqlite:///relative/path.db",
    "sqlite:////absolute/path.db",
    "redis://[[user]:password@]host[:port][/db]",
    "rediss://[[user]:password@]host[:port][/db]",
)


def open_gateway_store(config: "GatewayConfig") -> Store:
    """The store a gateway config names, with the Redis password read from where the config
    says (store_password_env / store_password_file); ConfigError when it cannot be read."""
    password = None
    if config.store_password.named:
        password = read_secret(config.store_password, "store", env_key="store_password_env",
                               file_key="store_password_file")
    store = open_store(config.store, timeout=config.store_timeout, password=password)
    try:
        store.check_format()  # a state written by a newer mailmoat is never used
    except StoreUnavailable:
        pass  # down now: every operation says so; the next start checks the format
    except BaseException:
        store.close()
        raise
    return store


def open_store(url: str, *, timeout: float = 2.0, password: str | None = None) -> Store:
    """Open the store a config's `store:` URL names (no connection is made yet).

    The Redis password is `password`, else the URL's (kept for programs that build their
    own URL; a config file may not hold one), else $MAILMOAT_REDIS_PASSWORD.
    """
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite:///"):
        # Three slashes then the path: "./x.db" relative, "/x.db" absolute.
        return SqliteStore(url[len("sqlite:///") :], timeout=timeout)
    if url.startswith(("redis://", "rediss://")):
        return _open_redis(url, timeout, password)
    raise StoreError(
        f"unknown store URL {_redact(url)!r}; accepted forms: " + ", ".join(ACCEPTED_FORMS)
    )


def _open_redis(url: str, timeout: float, given: str | None) -> Store:
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
        path = parts.path.strip("/")
        db = int(path) if path else 0
    except ValueError as exc:
        raise StoreError(f"bad Redis URL {_redact(url)}: {exc}") from exc
    if not parts.hostname:
        raise StoreError(f"bad Redis URL {_redact(url)}: no host")
    password = given or (unquote(parts.password) if parts.password
                         else os.environ.get(PASSWORD_ENV))
    from .redis_store import RedisStore  # redis-py is only loaded when Redis is configured
    return RedisStore(
        host=parts.hostname,
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=password or None,
        ssl=parts.scheme == "rediss",
        timeout=timeout,
    )


def _redact(url: str) -> str:
    """The URL without its password, fit for an error message or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def redis_client(config: "GatewayConfig", what: str, *, retry_once: bool = False) -> tuple[
        "redis.Redis", str]:
    """A client of the Redis the config's `store:` names, for the logs that live beside the
    Store there (the audit log, the review book): the same server, password and timeouts,
    replies as text. (client, "host:port" for messages); StoreError for a bad URL.
    `retry_once`: one retry on a dropped connection (writers that must not double-append
    leave it off)."""
    import redis  # only where Redis is configured
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    parts = urlsplit(config.store)
    try:
        port, db = parts.port or 6379, int(parts.path.strip("/") or 0)
    except ValueError as exc:
        raise StoreError(f"bad Redis URL for the {what}: {exc}") from None
    password = os.environ.get(PASSWORD_ENV)  # as the Store reads it
    if config.store_password.named:
        password = read_secret(config.store_password, "store", env_key="store_password_env",
                               file_key="store_password_file")
    extra = {"retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))} \
        if retry_once else {}
    client = redis.Redis(host=parts.hostname or "127.0.0.1", port=port, db=db,
                         username=unquote(parts.username) if parts.username else None,
                         password=password, ssl=parts.scheme == "rediss",
                         socket_timeout=max(config.store_timeout, 2.0),
                         socket_connect_timeout=max(config.store_timeout, 2.0),
                         decode_responses=True, **extra)
    return client, f"{parts.hostname}:{port}"
