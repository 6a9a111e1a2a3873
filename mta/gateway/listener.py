"""Run the SMTP front end on an asyncio loop, in the foreground (`serve`) or in a thread."""
from __future__ import annotations

import asyncio
import threading

from mta.aio.event_loop import new_event_loop
from mta.smtp_in.server import GatewayHandler, SmtpConnection
from .privileges import take_bound


async def start_listener(handler: GatewayHandler, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    bound = take_bound(host, port)  # bound by serve as root, before it dropped to its user
    if bound is not None:
        return await loop.create_server(lambda: SmtpConnection(handler), sock=bound)
    return await loop.create_server(lambda: SmtpConnection(handler), host, port,
                                    reuse_address=True)


class ThreadedListener:
    """The listener on its own event loop in a daemon thread (tests, embedding)."""

    def __init__(self, handler: GatewayHandler, host: str, port: int) -> None:
        self.handler, self.host, self.port = handler, host, port
        self.loop = new_event_loop()  # the same loop as serve's
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="smtpd", daemon=True)

    def start(self) -> "ThreadedListener":
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            start_listener(self.handler, self.host, self.port), self.loop)
        self._server = future.result(timeout=10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "ThreadedListener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
