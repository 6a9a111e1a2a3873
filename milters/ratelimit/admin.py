"""`mailmoat ratelimit show [IP]` and `mailmoat ratelimit reset IP`: what the store holds,
in the units an admin thinks in (points now, bucket use now)."""
from __future__ import annotations

import ipaddress
import time

from milters.core.store import Record, Store
from milters.core.store.base import decayed_points, drained_level

from .limiter import ip_key
from .settings import RatelimitSettings


def _who_and_what(record: Record) -> tuple[str, str]:
    head, _, tail = record.key.partition(":[")
    subject, _, what = tail.rpartition("]:")
    return f"{head.split(':', 1)[1]} {subject}", what


def _describe(record: Record, settings: RatelimitSettings, now: float,
              points_of: dict[str, float]) -> tuple[str, str, str] | None:
    """(who, what, state) for one stored record; None for a bucket that has drained.
    `points_of`: each subject's points now."""
    who, what = _who_and_what(record)
    age = f"updated {now - record.updated:.0f}s ago"
    points = points_of.get(who, 0.0)
    if what == "points":
        share = settings.points.slowdown(points) * 100
        blocked = "  BLOCKED (new mail tempfailed)" if points >= settings.points.tempfail_at else ""
        return who, "points", f"{points:.1f} (limits at {share:.0f}% speed){blocked}; {age}"
    name = what.removeprefix("bucket:")
    limit = settings.limit(name)
    if limit is None:
        return who, name, f"{record.value:.1f} used (limit no longer in the policy); {age}"
    # The store keeps a bucket until it would have drained at a fraction of its rate
    # (store.base.SLOWEST_DRAIN); it drains at the speed its owner's points allow now.
    rate = limit.rate * settings.points.slowdown(points)
    level = drained_level(record.value, record.updated, rate, now)
    if level <= 0.0:
        return None
    return who, name, f"{level:.1f} of {limit.burst} used; {age}"


def show(store: Store, settings: RatelimitSettings, ip: str | None = None) -> list[str]:
    now = time.time()
    prefix = ip_key(ipaddress.ip_address(ip)) if ip else "rl:"
    records = store.records(prefix, now=now)
    points_of = {who: decayed_points(record.value, record.updated,
                                     settings.points.half_life, now)
                 for record in records
                 for who, what in [_who_and_what(record)] if what == "points"}
    rows = [row for row in (_describe(record, settings, now, points_of) for record in records)
            if row is not None]
    if not rows:
        return [f"nothing recorded for {ip}" if ip else "nothing recorded"]
    width = max(len(who) for who, _, _ in rows)
    what_width = max(len(what) for _, what, _ in rows)
    return [f"{who:<{width}}  {what:<{what_width}}  {state}" for who, what, state in rows]


# Running milters write the counts they let through a moment later (write-behind).
IN_FLIGHT_SECONDS = 0.5


def reset(store: Store, ip: str, settle: float = IN_FLIGHT_SECONDS) -> int:
    """Forget an IP's points and buckets; returns how many records the store held.

    Deleting, waiting until counts in flight from running milters have landed, and deleting
    again leaves nothing of the IP's past behind, on every gateway sharing the store."""
    prefix = ip_key(ipaddress.ip_address(ip))
    removed = store.delete(prefix)
    if settle > 0:
        time.sleep(settle)
        store.delete(prefix)
    return removed
