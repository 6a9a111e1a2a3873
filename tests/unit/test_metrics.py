"""The Prometheus page: counters, and histograms whose buckets are cumulative as the text
format wants (each observation is counted once, in its own bucket, and summed up on render)."""
from __future__ import annotations

from mta.metrics import BUCKETS, Registry


def test_histogram_buckets_are_cumulative_and_count_every_observation() -> None:
    registry = Registry()
    for value in (0.0005, 0.001, 0.003, 0.003, 0.2, 7.0):
        registry.observe("latency_seconds", value, milter="m", stage="mail")
    registry.count("things_total", 2.0, by="x")
    lines = registry.render().splitlines()
    buckets = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
               for line in lines if line.startswith("latency_seconds_bucket")}
    assert buckets["0.001"] == 2  # 0.0005 and 0.001 (le: less than or equal)
    assert buckets["0.0025"] == 2
    assert buckets["0.005"] == 4
    assert buckets["0.25"] == 5
    assert buckets["5"] == 5
    assert buckets["+Inf"] == 6
    assert list(buckets) == [f"{bound:g}" for bound in BUCKETS] + ["+Inf"]
    assert 'latency_seconds_count{milter="m",stage="mail"} 6' in lines
    assert 'latency_seconds_sum{milter="m",stage="mail"} 7.207500' in lines
    assert 'things_total{by="x"} 2' in lines


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
