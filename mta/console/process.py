"""serve's side of the console: `mailmoat console` as a supervised child, restarted when it
dies (throttled like the milters: a console that cannot start waits 1, 2, 4 ... up to 60
seconds between tries) and stopped with serve."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from typing import Callable

from milters.core.eventlog import log_event

STABLE_AFTER = 30.0  # s: dying after this long is bad luck; sooner, a console that cannot run
MAX_THROTTLE = 60.0
STOP_WAIT = 15.0  # s: SIGTERM, then SIGKILL


class ConsoleProcess:
    def __init__(self, config_path: str, preexec: Callable[[], None] | None = None) -> None:
        # serve has dropped to gateway.user already: the console runs as that user.
        self.command = [sys.executable, "-m", "mta.cli", "console", "--config", config_path]
        self._preexec = preexec
        self._quick_deaths = 0
        self._next_start = 0.0
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self.command, preexec_fn=self._preexec)
        self._started_at = time.monotonic()
        log_event("console_process_started", pid=process.pid)
        return process

    def check(self) -> None:
        """Restart a dead console once its throttle has passed (called every second)."""
        if self.process.poll() is None:
            return
        now = time.monotonic()
        if not self._next_start:
            if now - self._started_at >= STABLE_AFTER:
                self._quick_deaths = 0
            self._quick_deaths += 1
            delay = (0.0 if self._quick_deaths == 1
                     else min(2.0 ** (self._quick_deaths - 2), MAX_THROTTLE))
            self._next_start = now + delay
            log_event("console_process_died", level=logging.ERROR,
                      status=self.process.returncode, action="restarting",
                      delay=f"{delay:g}s")
        if now >= self._next_start:
            self._next_start = 0.0
            self.process = self._start()

    def hangup(self) -> None:
        """Pass serve's SIGHUP on: the console loads its TLS certificate again."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        log_event("console_process_stopped", pid=self.process.pid)
