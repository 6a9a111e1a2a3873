"""Run an SMTP session's coroutine from its connection's own callbacks.

An asyncio Task would do, but every wake-up through it costs a loop turn: the read callback
sets a future and the task runs on the next turn. A session mostly waits for its client's
next line, so here the read callback resumes it there and then (one loop turn per command
instead of two). Whatever else the session awaits (a milter stage, work in a thread, TLS)
is an ordinary future and resumes it from its done callback, as a Task does; a milter
stage (ResumesDirectly) resumes it from the read callback that brought the milter's reply.
"""
from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Coroutine, Generator
from typing import Any


class ResumesDirectly(abc.ABC):
    """An awaitable that can resume a SessionRunner from the callback that completes it,
    rather than through a future's callback a loop turn later. Awaited elsewhere, it must
    not be: it yields itself, which only a SessionRunner understands."""

    @abc.abstractmethod
    def resume_with(self, callback: Callable[[], None]) -> None:
        """Call `callback` (once) when the awaited result is there."""


class _Input:
    """What the session awaits when it needs more input (only a SessionRunner runs it)."""

    def __await__(self) -> Generator[Any, None, None]:
        yield self


INPUT = _Input()


class SessionRunner:
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 coroutine: Coroutine[Any, Any, None]) -> None:
        self.loop, self.coroutine = loop, coroutine
        self.waiting_for_input = False
        self.done = False
        self._running = False

    def start(self) -> None:
        """Run the session now, up to its first wait."""
        self._step()

    def input_changed(self) -> None:
        """New input, the end of it or a lost connection: go on if the session waits for
        input (otherwise it finds out when it next reads)."""
        if self._running:  # called from within the session itself: once it has yielded
            self.loop.call_soon(self.input_changed)
        elif self.coroutine.cr_running:
            # Running, but not by us: it is being closed (GeneratorExit when serve stops with
            # the session open) and its clean-up closed the connection. Nothing to resume.
            return
        elif self.waiting_for_input:
            self.waiting_for_input = False
            self._step()

    def _step(self, _future: object = None) -> None:
        self._running = True
        try:
            awaited = self.coroutine.send(None)
        except StopIteration:
            self.done = True
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # the session handles its errors; this is a last resort
            self.done = True
            logging.getLogger("mailmoat").exception("SMTP session ended by an exception")
            return
        finally:
            self._running = False
        if awaited is INPUT:
            self.waiting_for_input = True
        elif isinstance(awaited, ResumesDirectly):
            awaited.resume_with(self._step)
        elif asyncio.isfuture(awaited):
            awaited._asyncio_future_blocking = False  # as a Task does: we wait for it
            awaited.add_done_callback(self._step)
        else:  # a bare yield (asyncio.sleep(0)): the next loop turn
            self.loop.call_soon(self._step)
