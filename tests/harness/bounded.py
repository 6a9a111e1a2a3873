"""Run a call that must not hang in a thread, waiting a bounded time: a hang fails the test
instead of stopping the suite."""
from __future__ import annotations

import threading
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
