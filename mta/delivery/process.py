"""Delivery in its own process beside `serve`'s SMTP server (as Postfix's qmgr and smtp
are beside smtpd), so that its Python never competes with receiving for one interpreter lock.

serve starts `mailmoat deliver` and writes each new queue ID to its stdin the moment the
message is on disk; the delivery process hands the ID to one of a few delivery threads at
once (no polling delay), and every second it also looks for mail whose retry time has come.
Its metric counts come back as JSON lines on its stdout, so that serve's metrics page shows
deliveries too. When serve stops it closes the pipe: the process finishes what it is doing
and exits. If it dies, serve starts it again (and logs it); nothing is lost, the queue is on
disk.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import queue as queue_module
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from milters.core.config import GatewayConfig
from milters.core.eventlog import log_event

from mta.metrics import METRICS, Registry
from mta.queue.spool import NoSuchMessage, Queue, SpoolError
from .queue_run import deliver_safely, next_wait
from .routing import Router, build_router

DELIVERY_THREADS = 4  # sessions to next hops in flight at once
SCAN_EVERY = 1.0  # seconds between looks for retries that are due


class DeliveryScheduler:
    """Runs deliveries on a few threads, never the same message twice at once. A message
    whose attempt could not even be recorded (the spool failing) waits in memory for the
    next step of the retry schedule: no error repeats at every scan."""

    def __init__(self, queue: Queue, router: Router, config: GatewayConfig,
                 threads: int = DELIVERY_THREADS) -> None:
        self.queue, self.router, self.config = queue, router, config
        self._todo: queue_module.Queue[str | None] = queue_module.Queue()
        self._busy: set[str] = set()
        self._failures: dict[str, tuple[int, float]] = {}  # ID: failures, not before (monotonic)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"delivery-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, queue_id: str) -> None:
        with self._lock:
            if queue_id in self._busy:
                return
            self._busy.add(queue_id)
        self._todo.put(queue_id)

    def submit_due(self) -> None:
        now = time.monotonic()
        for envelope in self.queue.due(time.time()):
            failed = self._failures.get(envelope.queue_id)
            if failed is None or failed[1] <= now:
                self.submit(envelope.queue_id)

    def stop(self) -> None:
        for _ in self._threads:
            self._todo.put(None)
        for thread in self._threads:
            thread.join(timeout=60)

    def _work(self) -> None:
        while (queue_id := self._todo.get()) is not None:
            try:
                envelope, message = self.queue.load(queue_id)
                if envelope.hold_reason is None and envelope.next_attempt <= time.time():
                    deliver_safely(self.queue, envelope, self.router, self.config.queue,
                                   self.config.hostname, time.time(), message)
                self._failures.pop(queue_id, None)
            except NoSuchMessage:
                self._failures.pop(queue_id, None)  # delivered, or deleted by the admin
            except Exception as exc:  # one bad message must not stop delivery
                self._back_off(queue_id, exc)
            finally:
                with self._lock:
                    self._busy.discard(queue_id)


    def _back_off(self, queue_id: str, exc: Exception) -> None:
        """The failed attempt is not on disk: keep its retry time here instead."""
        count = self._failures.get(queue_id, (0, 0.0))[0] + 1
        wait = next_wait(self.config.queue, count)
        self._failures[queue_id] = (count, time.monotonic() + wait)
        log_event("spool_error" if isinstance(exc, SpoolError) else "delivery_error",
                  level=logging.ERROR, queue_id=queue_id, error=f"{type(exc).__name__}: {exc}",
                  retry_in=round(wait))


def _forward_metrics(registry: Registry, out_fd: int) -> None:
    """Send each count to serve (one JSON line, atomic on a pipe) instead of keeping it."""
    lock = threading.Lock()

    def count(name: str, amount: float = 1.0, **labels: str) -> None:
        line = json.dumps([name, amount, labels]).encode() + b"\n"
        with lock:
            try:
                os.write(out_fd, line)
            except OSError:
                pass  # serve is gone; we are about to stop too

    registry.count = count  # type: ignore[method-assign]


def run_delivery(config: GatewayConfig, ids_fd: int = 0, metrics_fd: int = 1) -> None:
    """The body of `mailmoat deliver`: queue IDs in on `ids_fd`, counts out on `metrics_fd`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # serve decides when we stop
    # Below serve and the milters: under load the CPU goes to the clients waiting for a
    # reply first; deliveries still get their share (nice never starves a process).
    os.nice(config.queue.delivery_nice)
    _forward_metrics(METRICS, metrics_fd)
    queue = Queue(config.queue.dir)
    scheduler = DeliveryScheduler(queue, build_router(config), config)
    log_event("delivery_started", pid=os.getpid(), threads=DELIVERY_THREADS,
              nice=os.getpriority(os.PRIO_PROCESS, 0))
    pending = b""
    next_scan = 0.0
    while True:
        now = time.monotonic()
        if now >= next_scan:
            scheduler.submit_due()
            scheduler.router.close_idle()  # sessions to next hops idle too long
            next_scan = now + SCAN_EVERY
        readable, _, _ = select.select([ids_fd], [], [], max(0.0, next_scan - now))
        if not readable:
            continue
        data = os.read(ids_fd, 65536)
        if not data:
            break  # serve closed the pipe: it is stopping
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line:
                scheduler.submit(line.decode("ascii"))
    scheduler.stop()
    scheduler.router.close_idle(everything=True)
    log_event("delivery_stopped", pid=os.getpid())


class DeliveryProcess:
    """serve's side: start `mailmoat deliver`, tell it about new mail, read its counts."""

    def __init__(self, config_path: str | None, preexec: Callable[[], None] | None = None
                 ) -> None:
        self.command = [sys.executable, "-m", "mta.cli", "deliver"]
        if config_path:
            self.command += ["--config", config_path]
        self._preexec = preexec
        self._buffer = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        # The same few lines come again and again ("delivered", 1): parse each once.
        self._parsed: dict[bytes, tuple[str, float, dict[str, str]]] = {}
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   preexec_fn=self._preexec)
        assert process.stdin is not None and process.stdout is not None
        os.set_blocking(process.stdin.fileno(), False)
        os.set_blocking(process.stdout.fileno(), False)
        log_event("delivery_process_started", pid=process.pid)
        return process

    def notify(self, queue_id: str) -> None:
        """A new message is on disk: deliver it now. If the pipe is full or the process is
        being restarted, the message still goes out at its next scan (within a second)."""
        assert self.process.stdin is not None
        try:
            os.write(self.process.stdin.fileno(), queue_id.encode("ascii") + b"\n")
        except (BlockingIOError, BrokenPipeError):
            pass

    def watch_metrics(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        assert self.process.stdout is not None
        loop.add_reader(self.process.stdout.fileno(), self._read_metrics)

    def _read_metrics(self) -> None:
        assert self.process.stdout is not None
        try:
            data = os.read(self.process.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            if self._loop is not None:
                self._loop.remove_reader(self.process.stdout.fileno())
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                parsed = self._parsed.get(line)
                if parsed is None:
                    parsed = self._parse(line)
                name, amount, labels = parsed
                METRICS.count(name, amount, **labels)
            except (ValueError, TypeError):
                log_event("delivery_process_noise", level=logging.WARNING, line=line[:200])

    def _parse(self, line: bytes) -> tuple[str, float, dict[str, str]]:
        name, amount, labels = json.loads(line)
        if not (isinstance(name, str) and isinstance(amount, (int, float))
                and isinstance(labels, dict)):
            raise ValueError("not [name, amount, labels]")
        if len(self._parsed) < 256:  # a bound, should the labels ever vary freely
            self._parsed[line] = (name, float(amount), labels)
        return name, float(amount), labels

    def alive(self) -> bool:
        return self.process.poll() is None

    def restart(self) -> None:
        self._close_pipes()
        self.process = self._start()
        self._buffer = b""
        if self._loop is not None:
            self.watch_metrics(self._loop)

    def stop(self) -> None:
        """Close its input and wait until it has finished the deliveries in flight."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            self.process.wait(timeout=10)
        self._close_pipes()
        self._loop = None

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and not pipe.closed:
                if (pipe is self.process.stdout and self._loop is not None
                        and not self._loop.is_closed()):
                    self._loop.remove_reader(pipe.fileno())
                pipe.close()
