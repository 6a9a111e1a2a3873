"""The held-mail pages: /held (the list, search, reason filter, pages, bulk actions) and
/held/{id} (one message, its story and its actions). Every action is a form POST with the
session's CSRF token, answered by a redirect (POST/redirect/GET); what a role may do is
decided by mta/operations, and the buttons a role may not use are not shown."""
from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from . import pages
from .context import CSRF_FIELD, Console
from .held_api import (MAX_BODY, MAX_OFFSET, BodyTooLarge, call, int_param, read_body,
                       refused, status_of)

PAGE_SIZE = 50
MAX_FIELDS = 1100  # a bulk form: up to operations' 1000 IDs, the token and the action
FIELD_TEXT = 300  # characters of one audit field shown; the rest is cut with an ellipsis
# The outcomes a redirect may name (anything else in ?done= is ignored).
DONE = {"released", "released_partly", "deleted", "bulk"}
ERRORS = {400: "held.error.bad_request", 403: "held.error.forbidden",
          404: "error.not_found", 413: "held.error.too_large"}


def when(seconds: float | None) -> str:
    if not seconds:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def size(count: int) -> str:
    for unit in ("B", "KB", "MB"):
        if count < 1024 or unit == "MB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)


def shown_fields(fields: Any) -> str:
    """An audit record's own values as one line of JSON, cut (the template escapes it)."""
    text = json.dumps(fields or {}, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= FIELD_TEXT else text[:FIELD_TEXT] + "…"


async def read_form(request: Request) -> dict[str, list[str]]:
    """An urlencoded form, bounded in bytes and fields; each name maps to all its values."""
    raw = await read_body(request, MAX_BODY)
    form: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=MAX_FIELDS)
    except ValueError:  # over MAX_FIELDS
        raise BodyTooLarge() from None
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form


def routes(console: Console) -> list[Route]:
    def problem(request: Request, status: int, detail: str = "") -> Response:
        return pages.render(console, request, "held_error.html", status,
                            message=ERRORS.get(status, "held.error.failed"), detail=detail)

    def failure(request: Request, exc: Exception) -> Response:
        refused(request, console, exc)
        status, _ = status_of(exc)
        # A 404 says nothing more (the same words for missing and not yours).
        detail = str(exc)[:300] if status in (400, 403) else ""
        return problem(request, status, detail)

    async def posted(request: Request) -> tuple[dict[str, list[str]], Response | None]:
        """A logged-in session, a bounded form and its CSRF token; else the answer."""
        if console.actor(request) is None:
            return {}, pages.to_login(request)
        try:
            form = await read_form(request)
        except BodyTooLarge:
            return {}, problem(request, 413)
        if console.csrf_refused(request, (form.get(CSRF_FIELD) or [""])[0]):
            return {}, pages.render(console, request, "error.html", 403,
                                    message="error.forbidden")
        if console.operations is None:
            return {}, problem(request, 503)
        return form, None

    async def held_list(request: Request) -> Response:
        actor, refusal = pages.page_gate(console, request, "nav.held")
        if refusal is not None:
            return refusal
        params = request.query_params
        query, reason = params.get("q", "")[:200], params.get("reason", "")[:200]
        try:
            offset = int_param(params.get("offset"), 0, MAX_OFFSET)
        except ValueError:
            offset = 0
        try:
            page = await call(console.operations.held, actor, query=query,
                              reason=reason or None, offset=offset, limit=PAGE_SIZE)
        except Exception as exc:  # noqa: BLE001 - an error page, never a traceback
            return failure(request, exc)

        def link(new_offset: int) -> str:
            keep = {k: v for k, v in (("q", query), ("reason", reason)) if v}
            return "/held?" + urlencode({**keep, "offset": max(0, new_offset)})

        done = params.get("done", "")
        return pages.render(
            console, request, "held.html", title="nav.held", page=page, query=query,
            reason=reason, can_change=actor.role == "admin", when=when, size=size,
            done=done if done in DONE else "",
            ok=params.get("ok", "")[:6], failed=params.get("failed", "")[:6],
            prev_link=link(offset - PAGE_SIZE) if offset > 0 else None,
            next_link=link(offset + PAGE_SIZE) if offset + PAGE_SIZE < page.total else None)

    async def message(request: Request) -> Response:
        actor = console.actor(request)
        if actor is None:
            return pages.to_login(request)
        if console.operations is None:
            return problem(request, 404)
        queue_id = request.path_params["queue_id"]
        try:
            view = await call(console.operations.message, actor, queue_id)
            story = await call(console.operations.story, actor, queue_id)
        except Exception as exc:  # noqa: BLE001
            return failure(request, exc)
        done = request.query_params.get("done", "")
        pending = [r["address"] for r in view.envelope.get("recipients", [])
                   if r.get("status") == "pending"]
        return pages.render(
            console, request, "message.html", title="nav.held", view=view, story=story,
            pending=pending, can_change=actor.role == "admin", when=when, size=size,
            fields=shown_fields, done=done if done in DONE else "")

    async def release(request: Request) -> Response:
        form, answer = await posted(request)
        if answer is not None:
            return answer
        queue_id = request.path_params["queue_id"]
        chosen = [r for r in form.get("rcpt", []) if r]
        some = (form.get("mode") or ["all"])[0] == "some"
        if some and not chosen:
            return problem(request, 400, "choose at least one recipient")
        try:
            result = await call(console.operations.release, console.actor(request), queue_id,
                                chosen if some else None)
        except Exception as exc:  # noqa: BLE001
            return failure(request, exc)
        if result.action == "release_partly":  # the rest stay held: back to the message
            return RedirectResponse(f"/held/{queue_id}?done=released_partly", 303)
        return RedirectResponse("/held?done=released", 303)

    async def delete(request: Request) -> Response:
        form, answer = await posted(request)
        if answer is not None:
            return answer
        try:
            await call(console.operations.delete, console.actor(request),
                       request.path_params["queue_id"])
        except Exception as exc:  # noqa: BLE001
            return failure(request, exc)
        return RedirectResponse("/held?done=deleted", 303)

    async def bulk(request: Request) -> Response:
        form, answer = await posted(request)
        if answer is not None:
            return answer
        ids = [i for i in form.get("ids", []) if i]
        action = (form.get("action") or [""])[0]
        if not ids:
            return problem(request, 400, "select at least one message")
        try:
            results = await call(console.operations.bulk, console.actor(request), action, ids)
        except Exception as exc:  # noqa: BLE001
            return failure(request, exc)
        ok = sum(1 for r in results if r.ok)
        return RedirectResponse(f"/held?done=bulk&ok={ok}&failed={len(results) - ok}", 303)

    return [Route("/held", held_list, methods=["GET"], name="nav.held"),
            Route("/held/bulk", bulk, methods=["POST"]),
            Route("/held/{queue_id}", message, methods=["GET"]),
            Route("/held/{queue_id}/release", release, methods=["POST"]),
            Route("/held/{queue_id}/delete", delete, methods=["POST"])]
