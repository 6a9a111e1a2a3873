"""The audit pages: /audit (search by queue ID, Message-ID, address, dates, event),
/audit/{queue_id} (one message's story, record by record, hashes shortened) and
/audit/verify (the chain check, admins and auditors), and the same under /api/audit.
Everything goes through mta/operations (search_audit, story, verify_audit): a `user` gets
only records of their own mail there, and a story that is not theirs is a 404."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from milters.core.audit.tee import AUDITED, RENAMED

from . import pages
from .api import api_gate, error
from .context import Console
from .held_api import as_json, call, int_param, refused, status_of

PAGE_ROWS = 200  # records a search page shows (the newest first)
API_ROWS = 1000  # the most an API search returns
MAX_CRITERION = 320  # characters of one search field (an address is at most 254)
VALUE_TEXT = 200  # characters of one field value shown; the rest cut with an ellipsis
MAX_SHOWN_FIELDS = 40
SHORT_HASH = 12
# The events offered in the search form: the tee's, the renamed ones, the operations'.
EVENTS = sorted(AUDITED | set(RENAMED.values())
                | {"held", "released", "released_partly", "removed", "downloaded"})
ERRORS = {400: "audit.bad_request", 403: "audit.forbidden", 404: "error.not_found",
          429: "audit.verify_busy"}
TEXT_FIELDS = ("queue_id", "message_id", "address", "text")


class BadCriteria(Exception):
    """A search field that cannot be read (a date that is not one)."""


class Busy(Exception):
    """A chain check is already running in this console."""


def parse_time(value: str, *, end: bool) -> float | None:
    """YYYY-MM-DD or YYYY-MM-DDTHH:MM (what a date or datetime-local input sends), local
    time; a day given as an end means up to the end of that day."""
    value = value.strip()
    if not value:
        return None
    for fmt, whole_day in (("%Y-%m-%d", True), ("%Y-%m-%dT%H:%M", False),
                           ("%Y-%m-%dT%H:%M:%S", False), ("%Y-%m-%d %H:%M", False)):
        try:
            moment = datetime.strptime(value[:25], fmt)
        except ValueError:
            continue
        try:
            if whole_day and end:
                moment += timedelta(days=1)
            return moment.timestamp()
        except (OverflowError, OSError, ValueError):
            break
    raise BadCriteria(f"not a date: {value[:40]!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM)")


def criteria(params: Any) -> dict[str, Any]:
    """Operations.search_audit's criteria from the query string (empty fields left out)."""
    found: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = str(params.get(name, "")).strip()
        if len(value) > MAX_CRITERION:
            raise BadCriteria(f"{name} is longer than {MAX_CRITERION} characters")
        if value:
            found[name] = value
    since = parse_time(str(params.get("since", "")), end=False)
    until = parse_time(str(params.get("until", "")), end=True)
    if since is not None:
        found["since"] = since
    if until is not None:
        found["until"] = until
    event = str(params.get("event", "")).strip()
    if event:
        if len(event) > 100:
            raise BadCriteria("event is longer than 100 characters")
        found["events"] = [event]
    return found


def cut(value: Any, limit: int = VALUE_TEXT) -> str:
    text = value if isinstance(value, str) else repr(value) if not isinstance(
        value, (int, float, bool)) else str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def shown(fields: Any) -> list[tuple[str, str]]:
    """A record's fields as (name, value) pairs to print, each value cut (escaped later by
    the template: a field holding markup stays text)."""
    if not isinstance(fields, dict):
        return [("fields", cut(fields))]
    pairs = [(cut(name, 60), cut(value)) for name, value in sorted(fields.items())]
    if len(pairs) > MAX_SHOWN_FIELDS:
        pairs = pairs[:MAX_SHOWN_FIELDS] + [("…", f"{len(pairs) - MAX_SHOWN_FIELDS} more")]
    return pairs


def when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return str(seconds)


def short(digest: str | None) -> str:
    return (digest or "")[:SHORT_HASH]


def routes(console: Console) -> list[Route]:
    verifying = threading.Lock()  # one chain check at a time: it reads the whole log

    def may_verify(request: Request) -> bool:
        actor = console.actor(request)
        return actor is not None and actor.role in ("admin", "auditor")

    def problem(request: Request, exc: Exception) -> Response:
        if isinstance(exc, BadCriteria):
            status = 400
        elif isinstance(exc, Busy):
            status = 429
        else:
            refused(request, console, exc)
            status, _ = status_of(exc)
        detail = str(exc)[:300] if status == 400 else ""
        return pages.render(console, request, "audit_error.html", status,
                            message=ERRORS.get(status, "held.error.failed"), detail=detail)

    def api_problem(request: Request, exc: Exception) -> Response:
        if isinstance(exc, BadCriteria):
            return error(400, "bad_request", str(exc)[:300])
        if isinstance(exc, Busy):
            return error(429, "busy", "a chain check is running; try again when it ends")
        refused(request, console, exc)
        status, code = status_of(exc)
        return error(status, code, str(exc)[:300] if status < 500
                     else "the operation failed; see the log")

    def verify_now(actor: Any) -> Any:
        if not verifying.acquire(blocking=False):
            raise Busy()
        try:
            return console.operations.verify_audit(actor)
        finally:
            verifying.release()

    async def search_page(request: Request) -> Response:
        actor, refusal = pages.page_gate(console, request, "nav.audit")
        if refusal is not None:
            return refusal
        params = request.query_params
        try:
            asked = criteria(params)
            records = await call(console.operations.search_audit, actor, limit=PAGE_ROWS,
                                 **asked)
        except Exception as exc:  # noqa: BLE001 - an error page, never a traceback
            return problem(request, exc)
        form = {name: params.get(name, "")[:MAX_CRITERION]
                for name in (*TEXT_FIELDS, "since", "until", "event")}
        return pages.render(console, request, "audit.html", title="nav.audit",
                            records=records, form=form, events=EVENTS, limit=PAGE_ROWS,
                            may_verify=may_verify(request), when=when, shown=shown,
                            short=short)

    async def story_page(request: Request) -> Response:
        actor, refusal = pages.page_gate(console, request, "nav.audit")
        if refusal is not None:
            return refusal
        queue_id = request.path_params["queue_id"]
        try:
            records = await call(console.operations.story, actor, queue_id)
        except Exception as exc:  # noqa: BLE001
            return problem(request, exc)
        return pages.render(console, request, "audit_story.html", title="nav.audit",
                            queue_id=queue_id, records=records, when=when, shown=shown,
                            short=short, may_verify=may_verify(request))

    async def verify_page(request: Request) -> Response:
        actor, refusal = pages.page_gate(console, request, "nav.audit")
        if refusal is not None:
            return refusal
        try:
            result = await call(verify_now, actor)
        except Exception as exc:  # noqa: BLE001
            return problem(request, exc)
        return pages.render(console, request, "audit_verify.html", title="nav.audit",
                            result=result, short=short)

    async def search_api(request: Request) -> Response:
        actor, refusal = api_gate(console, request, "the audit log")
        if refusal is not None:
            return refusal
        try:
            limit = int_param(request.query_params.get("limit"), PAGE_ROWS, API_ROWS)
            asked = criteria(request.query_params)
        except ValueError:
            return error(400, "bad_request", "limit is a non-negative integer")
        except BadCriteria as exc:
            return api_problem(request, exc)
        try:
            records = await call(console.operations.search_audit, actor,
                                 limit=max(1, limit), **asked)
        except Exception as exc:  # noqa: BLE001 - each error as JSON
            return api_problem(request, exc)
        return JSONResponse({"records": as_json(records)})

    async def story_api(request: Request) -> Response:
        actor, refusal = api_gate(console, request, "the audit log")
        if refusal is not None:
            return refusal
        queue_id = request.path_params["queue_id"]
        try:
            records = await call(console.operations.story, actor, queue_id)
        except Exception as exc:  # noqa: BLE001
            return api_problem(request, exc)
        return JSONResponse({"queue_id": queue_id, "records": as_json(records)})

    async def verify_api(request: Request) -> Response:
        actor, refusal = api_gate(console, request, "the audit log")
        if refusal is not None:
            return refusal
        try:
            result = await call(verify_now, actor)
        except Exception as exc:  # noqa: BLE001
            return api_problem(request, exc)
        if result is None:
            return error(404, "no_audit_log", "no audit log is configured (audit.enabled)")
        return JSONResponse(as_json(result))

    # /audit/verify before /audit/{queue_id}: the first match wins.
    return [Route("/audit", search_page, methods=["GET"], name="nav.audit"),
            Route("/audit/verify", verify_page, methods=["GET"]),
            Route("/audit/{queue_id}", story_page, methods=["GET"]),
            Route("/api/audit", search_api, methods=["GET"]),
            Route("/api/audit/verify", verify_api, methods=["GET"]),
            Route("/api/audit/{queue_id}", story_api, methods=["GET"])]
