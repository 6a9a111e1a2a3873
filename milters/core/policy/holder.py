"""Keeps the policy in force and reloads it on SIGHUP or when the file changes.

A broken edit never takes effect: the last good policy stays in force and every problem
is logged, so a typo at 3 a.m. cannot open the gates.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Generic, TypeVar

from ..errors import ConfigError
from ..eventlog import log_event
from ..files import file_signature

T = TypeVar("T")


class PolicyHolder(Generic[T]):
    """Holds the current value loaded from one file; thread-safe to read via `.current`."""

    def __init__(self, path: Path, loader: Callable[[Path], T]) -> None:
        self.path = Path(path)
        self._loader = loader
        self._lock = threading.Lock()
        self._signature = file_signature(self.path)
        self._current: T = loader(self.path)  # a broken policy at start raises: refuse to start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> T:
        return self._current

    def reload(self, reason: str = "request") -> bool:
        """Load the file again; keep the old value and log every problem if it is broken."""
        with self._lock:
            self._signature = file_signature(self.path)
            try:
                value = self._loader(self.path)
            except ConfigError as exc:
                log_event("policy_reload_failed", level=logging.ERROR, file=str(self.path),
                          reason=reason, problems=len(exc.problems),
                          action="keeping the last good policy")
                for problem in exc.problems:
                    log_event("policy_problem", level=logging.ERROR, detail=problem)
                return False
            self._current = value
        log_event("policy_reloaded", file=str(self.path), reason=reason)
        return True

    def reload_if_changed(self) -> bool:
        if file_signature(self.path) == self._signature:
            return False
        return self.reload("file changed")

    def watch(self, interval: float = 2.0) -> None:
        """Poll the file in a daemon thread (inotify is not everywhere; a stat is cheap)."""
        def loop() -> None:
            while not self._stop.wait(interval):
                self.reload_if_changed()
        self._thread = threading.Thread(target=loop, name="policy-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
