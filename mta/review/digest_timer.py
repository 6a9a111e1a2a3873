"""serve's digest schedule: once per period (review.digest: at, every), restart-safe.

The periods start at `at` (local time) and follow each other every `every`; whole days are
counted on the calendar, so 08:30 stays 08:30 across a daylight-saving change. The start of
the last period that was sent is kept in a small file beside the queue (written atomically,
BEFORE the mails go: a crash while sending loses that run's remaining digests rather than
sending anyone a second one). A serve that was down when a period began sends once when it
starts; a first start with no file sends nothing until the next period begins.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time as clock_time
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Callable

from milters.core.config import GatewayConfig
from milters.core.config_review import DigestSettings
from milters.core.errors import MailmoatError
from milters.core.eventlog import log_event

from .digest_run import build_digests, send_digests

STATE_FILE = "digest-state.json"
DAY = 86400.0


def period_start(now: float, at: tuple[int, int, int], every: float) -> float:
    """The start of the period `now` is in (a unix time <= now), in local time."""
    local = datetime.fromtimestamp(now).astimezone()
    if every % DAY == 0:
        days = int(every // DAY)
        day = local.date()
        for _ in range(days + 2):  # the latest day on the cycle whose `at` has come
            if day.toordinal() % days == 0:
                start = datetime.combine(day, time(*at)).astimezone().timestamp()
                if start <= now:
                    return start
            day -= timedelta(days=1)
    anchor = datetime.combine(local.date(), time(*at)).astimezone().timestamp()
    return anchor + math.floor((now - anchor) / every) * every


class DigestTimer:
    def __init__(self, config: GatewayConfig, settings: DigestSettings, state: Path, *,
                 clock: Callable[[], float] = clock_time.time,
                 run: Callable[[float], None] | None = None) -> None:
        self.config, self.settings, self.state, self.clock = config, settings, state, clock
        self.run = run or self._send
        self.last = self._read()
        self._running: asyncio.Task[None] | None = None
        self._state_failed = False

    def _read(self) -> float | None:
        try:
            data = json.loads(self.state.read_text())
            last = float(data["period"])
            return last if math.isfinite(last) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: treated as "this period was sent" below (never twice).
            log_event("digest_state_unreadable", level=logging.WARNING, file=str(self.state),
                      error=str(exc)[:200])
            return None

    def _write(self, period: float) -> None:
        staged = self.state.with_name(self.state.name + ".tmp")
        with open(staged, "w", encoding="utf-8") as out:
            json.dump({"period": period, "written": self.clock()}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staged, self.state)
        self.last = period

    def due(self, now: float) -> float | None:
        """The period to send now, or None. With no state yet, the current period counts as
        sent (a fresh install does not mail everyone at once)."""
        period = period_start(now, self.settings.at, self.settings.every)
        if self.last is None:
            self._write(period)
            log_event("digest_scheduled", next=int(period + self.settings.every))
            return None
        return period if period > self.last else None

    # -- serve's loop calls this each round -----------------------------------------------
    def poke(self) -> None:
        if self._running is not None and not self._running.done():
            return
        try:
            period = self.due(self.clock())
            if period is None:
                return
            self._write(period)  # first: a crash while sending must not send again
        except OSError as exc:
            if not self._state_failed:  # once, not every round (about a second)
                log_event("digest_failed", level=logging.ERROR, error=f"state file: {exc}")
            self._state_failed = True
            return
        self._state_failed = False
        # In a thread: the re-injection listener the mails go to runs on this very loop.
        self._running = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self._run_logged, period))

    def _run_logged(self, period: float) -> None:
        try:
            self.run(period)
        except (MailmoatError, OSError) as exc:
            log_event("digest_failed", level=logging.ERROR, error=str(exc)[:300])

    def _send(self, period: float) -> None:
        now = self.clock()
        digests = build_digests(self.config, now=now)
        sent, failed = send_digests(self.config, digests, now)
        log_event("digest_run", period=int(period), sent=len(sent), failed=len(failed))

    async def stop(self) -> None:
        if self._running is not None and not self._running.done():
            await asyncio.wait([self._running], timeout=60)


def digest_timer(config: GatewayConfig, state_dir: Path | None = None) -> DigestTimer | None:
    """The timer, when review.digest is configured; its state file beside serve's queue,
    or in `state_dir` (behind Postfix, where there is no queue of ours)."""
    settings = config.review.digest
    if settings is None:
        return None
    where = Path(config.queue.dir) if state_dir is None else Path(state_dir)
    where.mkdir(parents=True, exist_ok=True)
    return DigestTimer(config, settings, where / STATE_FILE)


__all__ = ["DigestTimer", "STATE_FILE", "digest_timer", "period_start"]
