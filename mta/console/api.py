"""The JSON API under /api/: the same session as the pages; a POST carries the session's
CSRF token in the X-CSRF-Token header. Every error is a JSON object, never a page."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from milters.core.eventlog import log_event

from .context import CSRF_HEADER, Console, source_of


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def unauthenticated() -> JSONResponse:
    return error(401, "unauthenticated", "log in first (POST /login)")


def api_gate(console: Console, request: Request, what: str) -> tuple[Any, Response | None]:
    """(actor, None) for a logged-in request on a console with its operations; else (None,
    the JSON refusal): 401 without a session, 503 naming `what` without the operations."""
    actor = console.actor(request)
    if actor is None:
        return None, unauthenticated()
    if console.operations is None:
        return None, error(503, "unavailable", f"{what} is not available on this console")
    return actor, None


def routes(console: Console) -> list[Route]:
    async def me(request: Request) -> Response:
        actor = console.actor(request)
        if actor is None:
            return unauthenticated()
        session = console.session(request)
        assert session is not None
        body: dict[str, Any] = {"name": actor.name, "role": actor.role,
                                "addresses": sorted(actor.addresses),
                                "language": console.language(request),
                                "csrf_token": session.csrf}
        return JSONResponse(body)

    async def logout(request: Request) -> Response:
        if console.csrf_refused(request, request.headers.get(CSRF_HEADER)):
            return error(403, "csrf", "the X-CSRF-Token header is missing or wrong")
        session = console.session(request)
        if session is not None:
            console.sessions.end(session)
            if session.actor is not None:
                log_event("console_logout", name=session.actor.name,
                          source=source_of(request))
        response = JSONResponse({"ok": True})
        console.clear_cookie(response)
        return response

    return [Route("/api/me", me, methods=["GET"]),
            Route("/api/logout", logout, methods=["POST"])]
