"""The Prometheus registry: an observer resolved once counts exactly like observe()."""
from __future__ import annotations

from mta.metrics import Registry


def test_an_observer_and_observe_fill_the_same_histogram() -> None:
    registry = Registry()
    fast = registry.observer("latency_seconds", milter="ratelimit", stage="mail")
    fast(0.0004)
    fast(0.02)
    registry.observe("latency_seconds", 3.0, stage="mail", milter="ratelimit")
    lines = registry.render().splitlines()
    labels = 'milter="ratelimit",stage="mail"'
    assert f'latency_seconds_bucket{{{labels},le="0.001"}} 1' in lines
    assert f'latency_seconds_bucket{{{labels},le="0.025"}} 2' in lines
    assert f'latency_seconds_bucket{{{labels},le="2.5"}} 2' in lines
    assert f'latency_seconds_bucket{{{labels},le="+Inf"}} 3' in lines
    assert f"latency_seconds_count{{{labels}}} 3" in lines
    assert f"latency_seconds_sum{{{labels}}} 3.020400" in lines
