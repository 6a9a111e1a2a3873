"""The console's overview: counts per hour or day from the audit log, and the ratelimit's
top sources from the Store (by points now)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from milters.core.store.base import decayed_points
from milters.core.store.keys import RATELIMIT_IP_PREFIX, RATELIMIT_POINTS

# Each series and the audit events counted in it. "EVENT:DETAIL" names are what the audit
# log's counts() adds for records whose event alone says too little (audit/base.py
# detail_events): a message held on arrival is a `queued` record with a `held` field; a
# milter's refusal is a `milter_verdict` with its action (reject, tempfail and discard,
# as the Prometheus counter mailmoat_messages_rejected_total counts them).
SERIES: dict[str, tuple[str, ...]] = {
    "received": ("queued",),
    "rejected": ("reject", "milter_verdict:reject", "milter_verdict:tempfail",
                 "milter_verdict:discard"),
    "held": ("held", "queued:held"),
    "encrypted": ("encrypted",),
    "neutralized": ("neutralized",),
    "delivered": ("delivered",),
    "bounced": ("bounced",),
}
STEPS = (3600, 86400)
MAX_BUCKETS = 400
TOP_SOURCES = 10


@dataclass(frozen=True)
class Source:
    ip: str
    points: float  # now (decayed), or as stored when the half-life is not known
    updated: float


@dataclass(frozen=True)
class Overview:
    step: int
    starts: list[float]  # each bucket's start (unix time), oldest first
    series: dict[str, list[int]]  # SERIES name -> count per bucket
    totals: dict[str, int]
    top_sources: list[Source]


def bucket_starts(now: float, step: int, buckets: int) -> list[float]:
    last = math.floor(now / step) * step  # UTC-aligned: hours and days start on the hour
    return [float(last - step * i) for i in range(buckets - 1, -1, -1)]


def build_overview(counts: dict[tuple[float, str], int], starts: list[float],
                   step: int, sources: list[Source]) -> Overview:
    index = {start: i for i, start in enumerate(starts)}
    series = {name: [0] * len(starts) for name in SERIES}
    of_event = {event: name for name, events in SERIES.items() for event in events}
    for (start, event), number in counts.items():
        name, at = of_event.get(event), index.get(float(start))
        if name is not None and at is not None:
            series[name][at] += int(number)
    return Overview(step, starts, series, {k: sum(v) for k, v in series.items()}, sources)


def top_sources(store: Any, now: float, half_life: float | None) -> list[Source]:
    if store is None:
        return []
    found = []
    for record in store.records(RATELIMIT_IP_PREFIX, now=now):
        head, _, what = record.key.rpartition("]:")
        if what != RATELIMIT_POINTS or not head.startswith(RATELIMIT_IP_PREFIX + "["):
            continue
        points = record.value if half_life is None else \
            decayed_points(record.value, record.updated, half_life, now)
        found.append(Source(head[len(RATELIMIT_IP_PREFIX) + 1:], round(points, 2),
                            record.updated))
    found.sort(key=lambda source: (-source.points, source.ip))
    return found[:TOP_SOURCES]
