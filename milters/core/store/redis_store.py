"""Redis store: several gateways share one Redis.

Every operation is one Lua script, so it is atomic across gateways. A record
is a hash {v: value, u: updated, e: expires} under `namespace + key`, with a
PEXPIRE so Redis forgets it EXPIRY_GRACE after it is worth nothing. The scripts repeat the
formulas of base.py; numbers travel as "%.17g" strings because Redis turns a
Lua number reply into an integer.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from milters.core.errors import StoreError, StoreUnavailable

from .base import (
    POINTS_EPSILON,
    SLOWEST_DRAIN,
    Admission,
    BucketResult,
    Record,
    Store,
    Take,
    check_bucket_args,
    check_points_args,
    newer_format_error,
    STATE_FORMAT,
    retry_after,
    slowdown_factor,
)

T = TypeVar("T")

# Redis forgets a record this long after it is worth nothing. Values are computed from the
# caller's `now`, expiry runs on Redis's clock: the grace keeps a record readable across the
# round trip and a small clock skew between gateways, so no backend drops a value another
# would still count. A record read in the grace is worth nothing anyway: points and buckets
# have decayed, and a counter past its `keep` starts again from zero.
EXPIRY_GRACE = 2.0
_LUA_CONSTANTS = (f"local GRACE_MS = {int(EXPIRY_GRACE * 1000)}\n"
                  f"local SLOWEST_DRAIN = {SLOWEST_DRAIN!r}\n")

# Shared by every script: read a record's hash, store a value with its expiry.
_LUA_COMMON = _LUA_CONSTANTS + """
local function fmt(x) return string.format('%.17g', x) end
-- (value, updated), nil when absent; `expiring`: a bucket or counter is also absent once
-- past its expiry (a points score decays to nothing by itself)
local function read(key, now, expiring)
  local f = redis.call('HMGET', key, 'v', 'u', 'e')
  local v, e = tonumber(f[1]), tonumber(f[3])
  if v == nil or (expiring and e ~= nil and e < now) then return nil, nil end
  return v, tonumber(f[2])
end
local function load(now, expiring)
  local v, u = read(KEYS[1], now, expiring)
  if v == nil then return 0, now end
  return v, u
end
local function store(key, v, u, ttl)
  redis.call('HSET', key, 'v', fmt(v), 'u', fmt(u), 'e', ttl and fmt(u + ttl) or '')
  if ttl then
    redis.call('PEXPIRE', key, math.ceil(ttl * 1000) + GRACE_MS)
  else
    redis.call('PERSIST', key)
  end
end
"""

# ARGV: cost, rate, capacity, now. Returns {allowed 0/1, level}.
_LUA_BUCKET = _LUA_COMMON + """
local cost, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local cap, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local level, updated = load(now, true)
local drained = level - rate * math.max(0, now - updated)
if drained < 0 then drained = 0 end
if drained + cost > cap then return {0, fmt(drained)} end
local new = drained + cost
if cost > 0 then
  local ttl = nil
  if rate > 0 then ttl = new / rate end
  store(KEYS[1], new, math.max(now, updated), ttl)
end
return {1, fmt(new)}
"""

# ARGV: amount, half_life, now, epsilon. Returns the new value.
_LUA_POINTS = _LUA_COMMON + """
local amount, half = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, eps = tonumber(ARGV[3]), tonumber(ARGV[4])
local value, updated = load(now, false)
local new = value * math.pow(0.5, math.max(0, now - updated) / half) + amount
if new < eps then new = 0 end
if amount == 0 then return fmt(new) end
if new == 0 then
  redis.call('DEL', KEYS[1])
  return '0'
end
store(KEYS[1], new, math.max(now, updated), half * math.log(new / eps) / math.log(2))
return fmt(new)
"""

# ARGV: amount, keep, now. Returns the new value of a plain counter.
# Every key of KEYS counted in one script (atomic together). Returns the new values,
# space-separated, in the order of KEYS.
_LUA_COUNTER = _LUA_COMMON + """
local amount, keep, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i, key in ipairs(KEYS) do
  local value, updated = read(key, now, true)
  if value == nil then value, updated = 0, now end
  if now >= updated + keep then value = 0 end
  local new = value + amount
  store(key, new, now, keep)
  out[i] = fmt(new)
end
return table.concat(out, ' ')
"""

# One rate-limit decision (Store.admit). KEYS[1]: points (read only), KEYS[2..]: buckets.
# ARGV[1], one space-separated string (redis-py's per-argument packing costs more than the
# script): now, half_life, halve_every, refuse_at ('-' for none), epsilon, has_points (0/1),
# then cost, rate, burst, force (0/1) per bucket. Returns one string: points, refused, then
# fits, level, capacity per bucket. Writes only if every bucket fits and the points are
# below refuse_at, except forced buckets, which are always written and always fit.
_LUA_ADMIT = _LUA_COMMON + """
local A = {}
for word in string.gmatch(ARGV[1], '%S+') do A[#A + 1] = word end
local now, half, halve = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
local refuse_at, eps, has_points = tonumber(A[4]), tonumber(A[5]), A[6] == '1'
local points = 0
if has_points then
  local v, u = read(KEYS[1], now, false)
  if v ~= nil then
    points = v * math.pow(0.5, math.max(0, now - u) / half)
    if points < eps then points = 0 end
  end
end
local slow = math.pow(0.5, math.max(points, 0) / halve)
local refused = refuse_at ~= nil and points >= refuse_at
local ok = not refused
local out = {fmt(points), refused and 1 or 0}
local writes = {}
local apply = {}  -- forced writes now, the others only if all fit
for i = 2, #KEYS do
  local at = 7 + (i - 2) * 4
  local cost, full = tonumber(A[at]), tonumber(A[at + 1])
  local rate = full * slow
  local force = A[at + 3] == '1'
  local cap = math.max(1, math.floor(tonumber(A[at + 2]) * slow + 0.5))
  if force then cap, rate = math.huge, full end
  local level, updated = read(KEYS[i], now, true)
  if level == nil then level, updated = 0, now end
  local drained = level - rate * math.max(0, now - updated)
  if drained < 0 then drained = 0 end
  if drained + cost <= cap then
    table.insert(out, 1); table.insert(out, fmt(drained + cost))
    if cost > 0 then
      local w = {KEYS[i], drained + cost, math.max(now, updated), full * SLOWEST_DRAIN}
      table.insert(force and apply or writes, w)
    end
  else
    ok = false
    table.insert(out, 0); table.insert(out, fmt(drained))
  end
  table.insert(out, force and 'inf' or fmt(cap))
end
if ok then
  for _, w in ipairs(writes) do table.insert(apply, w) end
end
for _, w in ipairs(apply) do
  local new, lasts = w[2], w[4]
  store(w[1], new, w[3], lasts > 0 and new / lasts or nil)
end
return table.concat(out, ' ')
"""

_SCAN_BATCH = 500


def _glob_escape(text: str) -> str:
    """Make `text` match itself literally in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(Store):
    """Talks to one Redis.

    A timed-out script may have run, so only a broken connection is retried,
    once: counting one take twice is harmless, waiting out ten timeouts is not.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
        timeout: float = 2.0,
        namespace: str = "mailmoat:",
    ) -> None:
        self.where = f"{host}:{port}"
        self.namespace = namespace
        # Outside the namespace: records() and delete() scan it and read hashes only.
        self.format_key = namespace.rstrip(":") + ".format"
        self._client = redis.Redis(
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            ssl=ssl,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # redis-py's default retries ten times with backoff, which would
            # multiply the timeout of a dead Redis; one immediate retry on a
            # connection error still replaces a connection Redis dropped.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            decode_responses=True,
        )
        self._bucket = self._client.register_script(_LUA_BUCKET)
        self._points = self._client.register_script(_LUA_POINTS)
        self._counter = self._client.register_script(_LUA_COUNTER)
        self._admit = self._client.register_script(_LUA_ADMIT)

    # -- Store --------------------------------------------------------------

    def bucket_take(
        self, key: str, *, cost: float, rate: float, capacity: float, now: float
    ) -> BucketResult:
        check_bucket_args(cost, rate, capacity)
        args = [repr(float(x)) for x in (cost, rate, capacity, now)]
        allowed, level = self._call(lambda: self._bucket(keys=[self.namespace + key], args=args))
        level, capacity = float(level), float(capacity)
        if allowed:
            return BucketResult(True, level, capacity, 0.0)
        return BucketResult(False, level, capacity, retry_after(level, cost, capacity, rate))

    def points_add(self, key: str, amount: float, *, half_life: float, now: float) -> float:
        check_points_args(half_life)
        args = [repr(float(x)) for x in (amount, half_life, now, POINTS_EPSILON)]
        return float(self._call(lambda: self._points(keys=[self.namespace + key], args=args)))

    def counters_add(self, keys: list[str], amount: float, *, keep: float,
                     now: float) -> list[float]:
        args = [repr(float(x)) for x in (amount, keep, now)]
        reply = self._call(lambda: self._counter(keys=[self.namespace + k for k in keys],
                                                 args=args))
        return [float(word) for word in str(reply).split()]

    def admit(self, points_key: str | None, takes: list[Take], *, half_life: float,
              halve_every: float, refuse_at: float | None, now: float) -> Admission:
        check_points_args(half_life)
        keys = [self.namespace + (points_key or "")]
        words = [repr(float(now)), repr(float(half_life)), repr(float(halve_every)),
                 "-" if refuse_at is None else repr(float(refuse_at)), repr(POINTS_EPSILON),
                 "1" if points_key else "0"]
        for take in takes:
            check_bucket_args(take.cost, take.rate, take.burst)
            keys.append(self.namespace + take.key)
            words += [repr(float(take.cost)), repr(float(take.rate)), repr(float(take.burst)),
                      "1" if take.force else "0"]
        args = [" ".join(words)]
        reply = self._call(lambda: self._admit(keys=keys, args=args)).split()
        points, refused = float(reply[0]), bool(int(reply[1]))
        slow = slowdown_factor(points, halve_every)
        results = []
        for index, take in enumerate(takes):
            fits, level, capacity = reply[2 + 3 * index: 5 + 3 * index]
            level, capacity = float(level), float(capacity)
            wait = 0.0 if int(fits) else retry_after(level, take.cost, capacity, take.rate * slow)
            results.append(BucketResult(bool(int(fits)), level, capacity, wait))
        return Admission(points, slow, tuple(results), refused)

    def records(self, prefix: str, *, now: float | None = None) -> list[Record]:
        at = time.time() if now is None else now
        keys = self._keys(prefix)
        if not keys:
            return []

        def fetch() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, "v", "u", "e")
            return pipe.execute()

        found = []
        cut = len(self.namespace)
        for key, (v, u, e) in zip(keys, self._call(fetch)):
            if v is None:
                continue  # expired or deleted since the scan
            if e and float(e) < at:  # base.is_forgotten
                continue
            found.append(Record(key[cut:], float(v), float(u)))
        return sorted(found, key=lambda r: r.key)

    def delete(self, prefix: str) -> int:
        keys = self._keys(prefix)
        removed = 0
        for start in range(0, len(keys), _SCAN_BATCH):
            batch = keys[start : start + _SCAN_BATCH]
            removed += int(self._call(lambda: self._client.unlink(*batch)))
        return removed

    def ping(self) -> None:
        self._call(self._client.ping)

    def check_format(self) -> None:
        """Mark a Redis without a mark (SET NX: the gateways sharing it may start at once);
        refuse one marked by a newer mailmoat."""
        self._call(lambda: self._client.set(self.format_key, STATE_FORMAT, nx=True))
        found = self._call(lambda: self._client.get(self.format_key))
        try:
            version = int(found)
        except (TypeError, ValueError):
            raise StoreError(f"redis {self.where}: key {self.format_key} holds "
                             f"{found!r}, not a state format number") from None
        if version > STATE_FORMAT:
            raise newer_format_error(f"redis {self.where}", version)

    def close(self) -> None:
        try:
            self._client.close()
        except (RedisError, OSError):
            pass  # closing is best effort

    # -- internals ------------------------------------------------------------

    def _keys(self, prefix: str) -> list[str]:
        pattern = _glob_escape(self.namespace + prefix) + "*"
        return self._call(
            lambda: sorted(set(self._client.scan_iter(match=pattern, count=_SCAN_BATCH)))
        )

    def _call(self, fn: Callable[[], T]) -> T:
        with self._translate():
            return fn()

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn redis-py and socket errors into the mailmoat ones."""
        try:
            yield
        except (AuthenticationError, AuthorizationError) as exc:
            # Retrying or falling back would hide a configuration error.
            raise StoreError(f"redis {self.where}: {exc}") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis {self.where} unreachable: {exc}") from exc
        except RedisError as exc:
            raise StoreError(f"redis {self.where}: {exc}") from exc
