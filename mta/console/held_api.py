"""The JSON API for held mail: list, view, release (to all or some recipients), delete,
the original and bulk actions, each one call of mta/operations with the session's Actor.
The pages (held_pages.py) share the helpers here: a bounded body reader and the one
mapping from an operation's error to an HTTP status."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from milters.core.eventlog import log_event
from mta.operations import Forbidden, NotFound, OperationError
from mta.queue.spool import SpoolError

from .api import api_gate, error, unauthenticated
from .context import CSRF_HEADER, Console, source_of

MAX_BODY = 64 * 1024  # a request body: 1000 queue IDs fit, 10,000 do not (413)
MAX_OFFSET = 10_000_000


class BodyTooLarge(Exception):
    """The request body is over MAX_BODY (answered 413)."""


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The body, read in chunks and given up past `limit`: a huge or endless body costs
    at most `limit` bytes of memory, whatever Content-Length claims."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge()
    return bytes(body)


def status_of(exc: Exception) -> tuple[int, str]:
    """An operation's error as (HTTP status, error code); NotFound before its parent."""
    if isinstance(exc, NotFound):
        return 404, "not_found"
    if isinstance(exc, Forbidden):
        return 403, "forbidden"
    if isinstance(exc, OperationError):
        return 400, "bad_request"
    if isinstance(exc, SpoolError):
        return 503, "spool_unavailable"
    return 500, "internal"


def refused(request: Request, console: Console, exc: Exception) -> None:
    """Log what was refused: a Forbidden is someone trying a button their role lacks, and
    anything unexpected must reach the log (the person sees no traceback)."""
    status, _ = status_of(exc)
    actor = console.actor(request)
    if status == 403:
        log_event("console_action_refused", level=logging.WARNING,
                  name=getattr(actor, "name", None), source=source_of(request),
                  path=request.url.path[:200], reason=str(exc)[:300])
    elif status >= 500:
        log_event("console_held_error", level=logging.ERROR,
                  name=getattr(actor, "name", None), path=request.url.path[:200],
                  error=f"{type(exc).__name__}: {exc}"[:500])


async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """An operation off the event loop: it reads spool files and the audit log."""
    return await run_in_threadpool(function, *args, **kwargs)


def as_json(value: Any) -> Any:
    """Dataclasses (HeldPage, MessageView, ActionResult, audit records) as plain JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name.rstrip("_"): as_json(getattr(value, f.name))
                for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [as_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def int_param(value: str | None, default: int, top: int) -> int:
    """A query parameter that must be a small non-negative integer; ValueError if not."""
    if value is None or value == "":
        return default
    if not value.isdigit() or len(value) > 9:
        raise ValueError(value)
    return min(int(value), top)


def safe_filename(queue_id: str) -> str:
    return (re.sub(r"[^A-Za-z0-9_-]", "_", queue_id)[:64] or "message") + ".eml"


def routes(console: Console) -> list[Route]:
    def failure(request: Request, exc: Exception) -> Response:
        refused(request, console, exc)
        status, code = status_of(exc)
        message = str(exc)[:300] if status < 500 else "the operation failed; see the log"
        return error(status, code, message)

    async def held(request: Request) -> Response:
        actor, refusal = api_gate(console, request, "held mail")
        if refusal is not None:
            return refusal
        params = request.query_params
        try:
            offset = int_param(params.get("offset"), 0, MAX_OFFSET)
            limit = int_param(params.get("limit"), 50, 500)
        except ValueError:
            return error(400, "bad_request", "offset and limit are non-negative integers")
        try:
            page = await call(console.operations.held, actor, query=params.get("q", ""),
                              reason=params.get("reason") or None, offset=offset,
                              limit=max(1, limit))
        except Exception as exc:  # noqa: BLE001 - each error as JSON, never a traceback
            return failure(request, exc)
        return JSONResponse(as_json(page))

    async def message(request: Request) -> Response:
        actor, refusal = api_gate(console, request, "held mail")
        if refusal is not None:
            return refusal
        queue_id = request.path_params["queue_id"]
        try:
            view = await call(console.operations.message, actor, queue_id)
            story = await call(console.operations.story, actor, queue_id)
        except Exception as exc:  # noqa: BLE001
            return failure(request, exc)
        return JSONResponse({**as_json(view), "story": as_json(story)})

    async def original(request: Request) -> Response:
        actor, refusal = api_gate(console, request, "held mail")
        if refusal is not None:
            return refusal
        queue_id = request.path_params["queue_id"]
        try:
            data = await call(console.operations.original, actor, queue_id)
        except Exception as exc:  # noqa: BLE001
            return failure(request, exc)
        return Response(data, media_type="message/rfc822", headers={
            "content-disposition": f'attachment; filename="{safe_filename(queue_id)}"'})

    async def posted(request: Request) -> tuple[Any, Response | None]:
        """The checks every API POST passes: a session, its CSRF header, a bounded JSON
        object body (empty means {})."""
        if console.actor(request) is None:
            return None, unauthenticated()
        if console.csrf_refused(request, request.headers.get(CSRF_HEADER)):
            return None, error(403, "csrf", "the X-CSRF-Token header is missing or wrong")
        if console.operations is None:
            return None, error(503, "unavailable",
                               "held mail is not available on this console")
        try:
            raw = await read_body(request)
        except BodyTooLarge:
            return None, error(413, "too_large", f"the body is over {MAX_BODY} bytes")
        if not raw.strip():
            return {}, None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return None, error(400, "bad_json", "the body is not JSON")
        if not isinstance(body, dict):
            return None, error(400, "bad_request", "the body must be a JSON object")
        return body, None

    async def release(request: Request) -> Response:
        body, refusal = await posted(request)
        if refusal is not None:
            return refusal
        recipients = body.get("recipients")
        if recipients is not None and not (
                isinstance(recipients, list) and all(isinstance(r, str) for r in recipients)):
            return error(400, "bad_request", "recipients must be a list of addresses")
        try:
            result = await call(console.operations.release, console.actor(request),
                                request.path_params["queue_id"], recipients)
        except Exception as exc:  # noqa: BLE001
            return failure(request, exc)
        return JSONResponse(as_json(result))

    async def delete(request: Request) -> Response:
        body, refusal = await posted(request)
        if refusal is not None:
            return refusal
        try:
            result = await call(console.operations.delete, console.actor(request),
                                request.path_params["queue_id"])
        except Exception as exc:  # noqa: BLE001
            return failure(request, exc)
        return JSONResponse(as_json(result))

    async def bulk(request: Request) -> Response:
        body, refusal = await posted(request)
        if refusal is not None:
            return refusal
        action, ids = body.get("action"), body.get("ids")
        if not isinstance(action, str) or not (
                isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
            return error(400, "bad_request",
                         'send {"action": "release"|"delete", "ids": [QUEUE_ID, ...]}')
        try:
            results = await call(console.operations.bulk, console.actor(request), action, ids)
        except Exception as exc:  # noqa: BLE001
            return failure(request, exc)
        return JSONResponse({"results": as_json(results)})

    return [Route("/api/held", held, methods=["GET"]),
            Route("/api/held/{queue_id}", message, methods=["GET"]),
            Route("/api/held/{queue_id}/original", original, methods=["GET"]),
            Route("/api/held/{queue_id}/release", release, methods=["POST"]),
            Route("/api/held/{queue_id}/delete", delete, methods=["POST"]),
            Route("/api/bulk", bulk, methods=["POST"])]
