"""The review pages (issue 18): /review/TOKEN, where a review notice's link leads, and
/reviews, a logged-in person's pending reviews.

GET /review/TOKEN only shows what the link is for (mail scanners follow links: a GET
decides nothing); its form POSTs the decision, with a form token tied to the link's token
(HMAC with the review key: there may be no session). A link that is altered, expired,
used, or for a review already decided gets a page saying so and a 4xx status, never a
traceback. What may be decided is mta/operations/review.py's to say.
"""
from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from milters.core.eventlog import log_event
from mta.operations import Forbidden, NotFound
from mta.operations.review import ReviewLinkRefused, ReviewOperations
from milters.core.review.record import APPROVER_ACTIONS, KIND_ACTIONS, SENDER_ACTIONS

from . import pages
from .context import CSRF_FIELD, Console, source_of
from .held_api import BodyTooLarge, call, read_body
from .held_pages import size, when

MAX_FORM = 8 * 1024  # a decision's form: the token, a reason of 2000 characters (UTF-8)
# The page's words for each refusal (several reasons read the same to a person).
MESSAGES = {"malformed": "review.refused.invalid", "signature": "review.refused.invalid",
            "mismatch": "review.refused.not_yours", "wrong_person": "review.refused.not_yours",
            "expired": "review.refused.expired", "token_used": "review.refused.used",
            "decided": "review.refused.decided", "unknown": "review.refused.unknown",
            "self_approval": "review.refused.self_approval", "form": "review.refused.form",
            "not_due": "review.refused.decided", "no_next_approver": "review.refused.decided",
            "wrong_action": "review.refused.bad"}
DONE_STATES = {"sent", "approved", "cancelled", "rejected", "expired"}


async def _form(request: Request) -> dict[str, str] | None:
    """The first value of each field of a small urlencoded form; None when too large."""
    try:
        raw = await read_body(request, MAX_FORM)
    except BodyTooLarge:
        return None
    try:
        pairs = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=8)
    except ValueError:
        return None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


def routes(console: Console) -> list[Route]:
    def reviews() -> ReviewOperations | None:
        return getattr(console, "reviews", None)

    def refused(request: Request, reason: str, status: int) -> Response:
        return pages.render(console, request, "review_error.html", status, reason=reason,
                            message=MESSAGES.get(reason, "review.refused.bad"))

    def failed(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ReviewLinkRefused):
            return refused(request, exc.reason, exc.status)
        if isinstance(exc, NotFound):
            return refused(request, "unknown", 404)
        if isinstance(exc, Forbidden):
            return refused(request, "wrong_person", 403)
        # A book that is down, a key file that cannot be read: logged, never a traceback.
        log_event("console_review_error", level=logging.ERROR, path=request.url.path[:80],
                  error=f"{type(exc).__name__}: {exc}"[:500])
        return refused(request, "unavailable", 503)

    def unavailable(request: Request) -> Response:
        return pages.render(console, request, "review_error.html", 503, reason="unavailable",
                            message="review.refused.unavailable")

    async def show_link(request: Request) -> Response:
        ops = reviews()
        if ops is None:
            return unavailable(request)
        token = request.path_params["token"]
        try:
            view = await call(ops.open_link, token, None, source_of(request))
            form_token = ops.form_token(token)
        except Exception as exc:  # noqa: BLE001 - a page, never a traceback
            return failed(request, exc)
        return pages.render(console, request, "review_confirm.html", record=view.record,
                            person=view.person, action=view.action, token=token,
                            form_token=form_token, when=when, size=size)

    async def decide_link(request: Request) -> Response:
        ops = reviews()
        if ops is None:
            return unavailable(request)
        form = await _form(request)
        if form is None:
            return refused(request, "wrong_action", 413)
        token = request.path_params["token"]
        try:
            record = await call(ops.decide_by_link, token, form.get("form_token"),
                                source_of(request), form.get("reason", ""))
        except Exception as exc:  # noqa: BLE001
            return failed(request, exc)
        return pages.render(console, request, "review_done.html", record=record, when=when,
                            size=size)

    def actions_for(actor: Any, role_all: bool) -> Any:
        own = {a.lower() for a in actor.addresses}

        def actions(record: Any) -> list[str]:
            allowed = KIND_ACTIONS.get(record.kind, frozenset())
            mine = set()
            if record.sender in own or role_all:
                mine |= allowed & SENDER_ACTIONS
            if own & set(record.approvers[:record.step + 1]) or role_all:
                mine |= allowed & APPROVER_ACTIONS
            order = ("send_now", "confirm", "approve", "reject", "cancel")
            return [a for a in order if a in mine]
        return actions

    async def listing(request: Request) -> Response:
        actor = console.actor(request)
        if actor is None:
            return pages.to_login(request)
        ops = reviews()
        if ops is None:
            return unavailable(request)
        try:
            found = await call(ops.pending, actor)
        except Exception as exc:  # noqa: BLE001
            return failed(request, exc)
        own_actions = actions_for(actor, False) if actor.role != "auditor" else None
        sections = [("as_sender", found.as_sender, own_actions),
                    ("as_approver", found.as_approver, own_actions)]
        if actor.role in ("admin", "auditor"):
            sections.append(("everyone", found.everyone,
                             actions_for(actor, True) if actor.role == "admin" else None))
        done = request.query_params.get("done", "")
        return pages.render(console, request, "reviews.html", title="nav.reviews",
                            sections=sections, when=when, size=size,
                            done=done if done in DONE_STATES else "")

    async def decide(request: Request) -> Response:
        actor = console.actor(request)
        if actor is None:
            return pages.to_login(request)
        form = await _form(request)
        if form is None:
            return refused(request, "wrong_action", 413)
        if console.csrf_refused(request, form.get(CSRF_FIELD)):
            return pages.render(console, request, "error.html", 403, message="error.forbidden")
        ops = reviews()
        if ops is None:
            return unavailable(request)
        try:
            record = await call(ops.decide, actor, request.path_params["review_id"],
                                form.get("action", ""), form.get("reason", ""))
        except Exception as exc:  # noqa: BLE001
            return failed(request, exc)
        return RedirectResponse(f"/reviews?done={record.state}", 303)

    return [Route("/review/{token}", show_link, methods=["GET"]),
            Route("/review/{token}", decide_link, methods=["POST"]),
            Route("/reviews", listing, methods=["GET"], name="nav.reviews"),
            Route("/reviews/{review_id}/decide", decide, methods=["POST"])]
