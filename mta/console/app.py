"""The console's ASGI application: pages, the JSON API, /healthz and the static files,
behind the security headers. `create_app` takes the login and the operations as
parameters, so tests (and the CLI) choose what stands behind them."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from milters.core.config import ConsoleSettings

from . import api, audit_pages, held_api, held_pages, overview_pages, pages, review_pages
from .context import Authenticator, Console
from .security import SecurityHeaders
from .sessions import SessionStore

STATIC = Path(__file__).parent / "static"


def create_app(settings: ConsoleSettings, *, key: bytes, authenticate: Authenticator,
               operations: Any = None, clock: Callable[[], float] = time.time,
               extra_routes: Sequence[BaseRoute] = ()) -> SecurityHeaders:
    """The application. `key` signs the session cookies (sessions.load_secret_key);
    `extra_routes` are for tests only (a page that tries an inline script)."""
    console = Console(settings, SessionStore(key, settings.session_idle, settings.session_max,
                                             clock), authenticate, operations)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if request.url.path.startswith("/api/"):
            return api.error(status, "not_found" if status == 404 else "http_error",
                             "no such resource" if status == 404 else "request refused")
        if status == 404:
            return pages.render(console, request, "error.html", 404,
                                message="error.not_found")
        return PlainTextResponse(f"{status}\n", status_code=status)

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        # Held mail before the frame's placeholder /held (the first match wins).
        *held_pages.routes(console), *held_api.routes(console),
        *audit_pages.routes(console),
        *overview_pages.routes(console, clock),
        *review_pages.routes(console),
        *pages.routes(console), *api.routes(console), *extra_routes,
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    app.state.console = console
    return SecurityHeaders(app, tls=settings.tls)
