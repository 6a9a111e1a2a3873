"""Prometheus text-format metrics for `serve`, on a local port.

    mailmoat_messages_received_total                  messages whose DATA ended
    mailmoat_messages_rejected_total{by="..."}        refused by a milter (its name) or "smtpd"
    mailmoat_messages_queued_total
    mailmoat_deliveries_total{status="delivered|deferred|bounced"}
    mailmoat_queue_messages                           messages in the queue now
    mailmoat_milter_latency_seconds{milter,stage}     histogram of milter round trips
    mailmoat_milter_sessions_total{milter,connection="new|reused"}
                                                      SMTP sessions per milter, and whether
                                                      they opened a connection or reused one
    mailmoat_build_info{version,python}               1; the labels say what runs

The same listener answers /healthz (200 while the process and its event loop run) and
/readyz (200, or 503 with one reason per line: mta/gateway/health.py); any other path gets the
metrics.
"""
from __future__ import annotations

import asyncio
import platform
import threading
from bisect import bisect_left
from collections import defaultdict
from typing import Callable

from . import __version__  # one home for the version (pyproject.toml reads it too)

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


class Registry:
    """Counters and histograms, thread-safe (milter calls run in executor threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[str, dict[Labels, list[float]]] = defaultdict(dict)
        self._gauges: dict[str, Callable[[], float]] = {}
        self._info: dict[str, Labels] = {}
        self._keys: dict[Labels, Labels] = {}

    def _key(self, labels: dict[str, str]) -> Labels:
        # Label sets repeat (a handful per metric): sort each one once, not per event.
        given = tuple(labels.items())
        key = self._keys.get(given)
        if key is None:
            key = self._keys[given] = tuple(sorted(given))
        return key

    def count(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._counters[name][key] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.observer(name, **labels)(value)

    def observer(self, name: str, **labels: str) -> Callable[[float], None]:
        """observe() for one set of labels, looked up once: the per-stage hot paths keep it."""
        key = self._key(labels)
        with self._lock:
            # [count per bucket (le the bound, above the one before)..., above all, sum]
            cells = self._histograms[name].setdefault(key, [0.0] * (len(BUCKETS) + 2))
        lock = self._lock

        def observe(value: float) -> None:
            with lock:
                cells[bisect_left(BUCKETS, value)] += 1  # its own bucket; render() sums up
                cells[-1] += value
        return observe

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def info(self, name: str, **labels: str) -> None:
        """A gauge that is always 1 and says something in its labels (build_info)."""
        self._info[name] = tuple(sorted(labels.items()))

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                lines.append(f"# TYPE {name} counter")
                lines += [f"{name}{_labels(k)} {v:g}" for k, v in sorted(series.items())]
            for name, series in sorted(self._histograms.items()):
                lines.append(f"# TYPE {name} histogram")
                for key, cells in sorted(series.items()):
                    running = 0.0  # Prometheus buckets are cumulative
                    for bound, cell in zip(BUCKETS, cells):
                        running += cell
                        lines.append(f"{name}_bucket{_labels(key + (('le', f'{bound:g}'),))} "
                                     f"{running:g}")
                    total = running + cells[len(BUCKETS)]
                    lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {total:g}")
                    lines.append(f"{name}_sum{_labels(key)} {cells[-1]:.6f}")
                    lines.append(f"{name}_count{_labels(key)} {total:g}")
        for name, read in sorted(self._gauges.items()):
            lines += [f"# TYPE {name} gauge", f"{name} {read():g}"]
        for name, labels in sorted(self._info.items()):
            lines += [f"# TYPE {name} gauge", f"{name}{_labels(labels)} 1"]
        return "\n".join(lines) + "\n"


METRICS = Registry()
METRICS.info("mailmoat_build_info", version=__version__,
             python=platform.python_version())

# /readyz's checks: a list of problems, empty when ready (run in a worker thread).
ReadyCheck = Callable[[], list[str]]
PROMETHEUS_TYPE = b"text/plain; version=0.0.4"


def _path(head: bytes) -> bytes:
    """The request's path, without a query: `GET /readyz?x HTTP/1.1` -> b"/readyz"."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].split(b"?", 1)[0] if len(parts) >= 2 else b""


async def _respond(path: bytes, registry: Registry, ready: ReadyCheck | None
                   ) -> tuple[bytes, bytes, bytes]:
    """(status line, content type, body) for one request."""
    loop = asyncio.get_running_loop()
    if path == b"/healthz":
        return b"200 OK", b"text/plain", b"ok\n"
    if path == b"/readyz":
        try:
            problems = await loop.run_in_executor(None, ready) if ready else []
        except Exception as exc:  # a check that breaks says not ready, never nothing
            problems = [f"readiness check failed: {type(exc).__name__}: {exc}"]
        if problems:
            return (b"503 Service Unavailable", b"text/plain",
                    "".join(f"{p}\n" for p in problems).encode("utf-8", "replace"))
        return b"200 OK", b"text/plain", b"ready\n"
    return b"200 OK", PROMETHEUS_TYPE, (await loop.run_in_executor(None, registry.render)
                                        ).encode()


async def serve_metrics(host: str, port: int, registry: Registry = METRICS,
                        ready: ReadyCheck | None = None) -> asyncio.Server:
    """A minimal HTTP/1.0 responder: /healthz, /readyz (`ready` lists what is wrong), and
    the metrics on any other path (Prometheus scrapes /metrics)."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            status, kind, body = await _respond(_path(head), registry, ready)
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind + b"\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError,
                asyncio.LimitOverrunError):
            pass  # a client that does not speak HTTP gets nothing
        finally:
            writer.close()
    return await asyncio.start_server(answer, host, port)
