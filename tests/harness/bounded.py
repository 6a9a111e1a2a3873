"""Waits with a bound: a call that must not hang runs in a thread (`bounded`), a condition
is polled until it holds (`wait_until`). Either way a hang fails the test instead of
stopping the suite; nothing here measures how fast anything is."""
from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def bounded(call: Callable[[], T], timeout: float = 60.0, what: str = "the call"
            ) -> T | BaseException:
    """What `call` returned, or the exception it raised (handed to the test)."""
    outcome: list[T | BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=timeout)
    assert not thread.is_alive(), f"{what} hung past {timeout:g}s"
    return outcome[0]


def wait_until(condition: Callable[[], T], timeout: float,
               what: str | Callable[[], str] = "the condition", poll: float = 0.05) -> T:
    """`condition()`'s first true value, polled until `timeout` seconds have passed; then
    TimeoutError naming `what` (a callable is asked only then: a log read at the end)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what() if callable(what) else what}")
        time.sleep(poll)
