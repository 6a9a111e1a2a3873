"""The runner of SMTP sessions: input and direct awaitables (milter stages) resume the
session at once, from the caller (no loop turn); futures and bare yields resume it from the
loop, as a Task would."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any

import pytest

from mta.aio.session_runner import INPUT, ResumesDirectly, SessionRunner


def test_input_resumes_the_session_in_the_call_and_futures_from_the_loop() -> None:
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        later = loop.create_future()

        async def session() -> None:
            seen.append("started")
            await INPUT
            seen.append("input")
            seen.append(f"future {await later}")
            await asyncio.sleep(0)
            seen.append("after a bare yield")
            await INPUT
            seen.append("done")

        runner = SessionRunner(loop, session())
        runner.start()
        assert seen == ["started"] and runner.waiting_for_input
        runner.input_changed()
        assert seen == ["started", "input"] and not runner.waiting_for_input
        runner.input_changed()  # not waiting for input: nothing happens
        loop.call_soon(later.set_result, 42)
        for _ in range(5):
            await asyncio.sleep(0)
        assert seen[2:] == ["future 42", "after a bare yield"] and runner.waiting_for_input
        runner.input_changed()
        assert seen[-1] == "done" and runner.done

    asyncio.run(main())


def test_input_from_within_the_session_is_not_lost() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        runner: SessionRunner

        async def session() -> None:
            runner.input_changed()  # as if a read arrived while the session runs
            await INPUT
            seen.append("resumed")

        runner = SessionRunner(loop, session())
        runner.start()
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(main()) == ["resumed"]


def test_an_exception_ends_the_session_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> SessionRunner:
        async def session() -> None:
            await INPUT
            raise asyncio.CancelledError  # not an Exception: the session lets it through

        runner = SessionRunner(asyncio.get_running_loop(), session())
        runner.start()
        runner.input_changed()
        return runner

    assert asyncio.run(main()).done
    assert "SMTP session ended by an exception" in caplog.text


def test_a_direct_awaitable_resumes_the_session_in_the_callback_that_completes_it() -> None:
    class Stage(ResumesDirectly):
        def __init__(self) -> None:
            self.value: int | None = None
            self.then: Callable[[], None] | None = None

        def resume_with(self, callback: Callable[[], None]) -> None:
            self.then = callback

        def complete(self, value: int) -> None:
            self.value = value
            assert self.then is not None
            self.then()

        def __await__(self) -> Generator[Any, None, int]:
            if self.value is None:
                yield self
            assert self.value is not None
            return self.value

    async def main() -> list[str]:
        seen: list[str] = []
        stage = Stage()

        async def session() -> None:
            seen.append(f"got {await stage}")

        SessionRunner(asyncio.get_running_loop(), session()).start()
        stage.complete(7)
        seen.append("after complete")  # the session ran inside complete(), not later
        return seen

    assert asyncio.run(main()) == ["got 7", "after complete"]
