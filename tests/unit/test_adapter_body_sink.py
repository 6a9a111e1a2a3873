"""The adapter's body sink (MilterLogic.body_sink): a logic that takes the body chunk by
chunk gets every chunk and the adapter keeps none of them (the auth milter's memory bound,
issue 13 section 4); a sink that fails makes the message fail closed (451), never pass
unchecked. pymilter's context is replaced by a recorder: no libmilter here."""
from __future__ import annotations

from typing import Callable

import Milter

from milters.core.adapter import MilterAdapter, MilterLogic
from milters.core.edits import EomResult
from milters.core.message import Message
from milters.core.verdict import Verdict


class Context:
    """What the adapter calls on pymilter's context, recorded."""

    def __init__(self) -> None:
        self.replies: list[tuple[object, ...]] = []

    def getsymval(self, name: str) -> None:
        return None

    def setreply(self, *reply: object) -> None:
        self.replies.append(reply)


class Sinking(MilterLogic):
    name = "sinking"
    broken = False

    def __init__(self) -> None:
        self.events: list[object] = []

    def body_sink(self, headers: list[tuple[str, str]],
                  leading_space: bool) -> Callable[[bytes], None]:
        self.events.append(("start", tuple(headers)))

        def take(chunk: bytes) -> None:
            if self.broken:
                raise OSError("no space left on device")
            self.events.append(chunk)
        return take

    def on_message(self, message: Message) -> EomResult:
        self.events.append(("message", bytes(message.raw)))
        return EomResult(Verdict.cont())


def adapter(logic_class: type[Sinking]) -> tuple[MilterAdapter, Sinking, Context]:
    milter = MilterAdapter.bind(logic_class, logic_class)()
    context = Context()
    milter._ctx = context  # type: ignore[attr-defined]  # noqa: SLF001
    assert isinstance(milter.logic, Sinking)
    return milter, milter.logic, context


def test_every_chunk_goes_to_the_sink_and_the_adapter_keeps_none() -> None:
    milter, logic, _ = adapter(Sinking)
    milter.envfrom("<a@example.org>")
    milter.header("From", "a@example.org")
    for chunk in (b"one\r\n", b"two\r\n"):
        milter.body(chunk)
        assert milter._body == [] and milter._spool is None  # noqa: SLF001
    assert milter.eom() == Milter.CONTINUE
    assert logic.events == [("start", (("From", "a@example.org"),)), b"one\r\n", b"two\r\n",
                            ("message", b"From: a@example.org\r\n\r\n")]


def test_a_message_without_body_still_starts_its_own_sink() -> None:
    """The next message's on_message must never see the previous message's sink."""
    milter, logic, _ = adapter(Sinking)
    for subject in ("first", "second"):
        milter.envfrom("<a@example.org>")
        milter.header("Subject", subject)
        assert milter.eom() == Milter.CONTINUE
    assert logic.events == [("start", (("Subject", "first"),)),
                            ("message", b"Subject: first\r\n\r\n"),
                            ("start", (("Subject", "second"),)),
                            ("message", b"Subject: second\r\n\r\n")]


def test_a_failing_sink_tempfails_the_message_and_the_next_one_starts_clean() -> None:
    class Broken(Sinking):
        broken = True

    milter, logic, context = adapter(Broken)
    milter.envfrom("<a@example.org>")
    milter.header("From", "a@example.org")
    milter.body(b"chunk\r\n")
    assert milter.eom() == Milter.TEMPFAIL
    assert context.replies and context.replies[-1][0] == "451", context.replies
    assert not any(event[0] == "message" for event in logic.events if isinstance(event, tuple))
    Broken.broken = False  # the next transaction's sink works again
    milter.envfrom("<a@example.org>")
    milter.body(b"fine\r\n")
    assert milter.eom() == Milter.CONTINUE
    assert logic.events[-2:] == [b"fine\r\n", ("message", b"\r\n")]
