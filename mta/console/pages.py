"""The HTML side: login, logout, the language switch and the page frame (Held mail,
Audit, Overview). The pages over the operations slot into PAGES; the web layer only
translates requests, what may be done is decided in mta/operations."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from milters.core.errors import LoginError, LoginRefused, LoginThrottled
from milters.core.eventlog import log_event

from . import i18n
from .login import WRONG
from .context import CSRF_FIELD, Console, source_of

# Each page of the frame: (path, catalog key of its name). The navigation lists them.
PAGES = (("/held", "nav.held"), ("/audit", "nav.audit"), ("/overview", "nav.overview"),
         ("/reviews", "nav.reviews"))
HOME = "/held"
MAX_NAME = 256  # a name or password past login.py's limits: refused before any hashing
MAX_PASSWORD = 1024

# autoescape everywhere: whatever a message or a user puts in a name cannot become markup.
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=True, undefined=StrictUndefined)


def render(console: Console, request: Request, template: str, status: int = 200,
           **values: Any) -> HTMLResponse:
    language = console.language(request)
    session = console.session(request)
    actor = session.actor if session else None
    role = f"role.{actor.role}" if actor is not None else ""
    page = TEMPLATES.get_template(template).render(
        lang=language, t=lambda key, **v: i18n.text(key, language, **v),
        actor=actor, role_name=i18n.text(role, language) if role in i18n.CATALOG
        else getattr(actor, "role", ""), csrf=session.csrf if session else "",
        csrf_field=CSRF_FIELD, pages=PAGES, path=request.url.path, **values)
    return HTMLResponse(page, status_code=status)


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form: no files, few fields, short values (a flood costs little)."""
    try:
        form = await request.form(max_files=0, max_fields=8, max_part_size=4096)
    except Exception:  # starlette's MultiPartException and malformed bodies
        return {}
    return {key: value for key, value in form.items() if isinstance(value, str)}


def to_login(request: Request) -> Response:
    """The login page; saying so when the session had just ended (not merely absent)."""
    return RedirectResponse("/login?ended=1" if request.state.session_ended else "/login", 303)


def page_gate(console: Console, request: Request, title: str) -> tuple[Any, Response | None]:
    """(actor, None) for a logged-in request on a console with its operations; else (None,
    the answer): the login page without a session, the empty page `title` without the
    operations."""
    actor = console.actor(request)
    if actor is None:
        return None, to_login(request)
    if console.operations is None:
        return None, render(console, request, "page.html", title=title)
    return actor, None


def routes(console: Console) -> list[Route]:
    async def login_page(request: Request) -> Response:
        session = console.session(request)
        if session is not None and session.actor is not None:
            return RedirectResponse(HOME, 303)
        ended = request.state.session_ended or request.query_params.get("ended") == "1"
        message = "login.expired" if ended else None
        anonymous = session or console.sessions.new()  # carries the login form's CSRF token
        request.state.session = anonymous
        response = render(console, request, "login.html", message=message)
        console.set_cookie(response, anonymous)
        return response

    async def login(request: Request) -> Response:
        form = await _form(request)
        if console.csrf_refused(request, form.get(CSRF_FIELD)):
            return render(console, request, "error.html", 403, message="error.forbidden")
        name, password = form.get("name", "").strip(), form.get("password", "")
        source = source_of(request)
        if not name or len(name) > MAX_NAME or len(password) > MAX_PASSWORD:
            return render(console, request, "login.html", 401, message="login.refused")
        try:
            # scrypt costs tens of milliseconds and LDAP waits: off the event loop.
            actor = await run_in_threadpool(console.authenticate, name, password, source)
        except LoginThrottled as exc:
            seconds = math.ceil(exc.retry_after)
            response = render(console, request, "login.html", 429,
                              message="login.throttled", seconds=seconds)
            response.headers["retry-after"] = str(seconds)
            return response
        except LoginRefused as exc:
            # The same words for a wrong password and an unknown name; a store or directory
            # that is down reads differently (WRONG is the one refusal of a person).
            if str(exc) == WRONG:
                return render(console, request, "login.html", 401, message="login.refused")
            return render(console, request, "login.html", 503, message="login.unavailable")
        except LoginError:
            return render(console, request, "login.html", 401, message="login.refused")
        except Exception as exc:  # e.g. a directory that answers garbage: no traceback page
            log_event("console_login_error", level=logging.ERROR, name=name, source=source,
                      error=f"{type(exc).__name__}: {exc}")
            return render(console, request, "login.html", 503, message="login.unavailable")
        old = console.session(request)
        language = old.language if old else None
        if old is not None:
            console.sessions.end(old)  # a new ID at login: a planted cookie gains nothing
        session = console.sessions.new(actor, language)
        response = RedirectResponse(HOME, 303)
        console.set_cookie(response, session)
        return response

    async def logout(request: Request) -> Response:
        form = await _form(request)
        if console.csrf_refused(request, form.get(CSRF_FIELD)):
            return render(console, request, "error.html", 403, message="error.forbidden")
        session = console.session(request)
        if session is not None:
            console.sessions.end(session)
            if session.actor is not None:
                log_event("console_logout", name=session.actor.name,
                          source=source_of(request))
        response = RedirectResponse("/login", 303)
        console.clear_cookie(response)
        return response

    async def language(request: Request) -> Response:
        form = await _form(request)
        if console.csrf_refused(request, form.get(CSRF_FIELD)):
            return render(console, request, "error.html", 403, message="error.forbidden")
        session = console.session(request)
        chosen = form.get("language", "")
        if session is not None and chosen in i18n.LANGUAGES:
            session.language = chosen
        # Back to a page of ours only: never to a place the form names freely.
        back = form.get("back", "")
        known = {path for path, _ in PAGES} | {"/login"}
        return RedirectResponse(back if back in known else HOME, 303)

    def page(path: str, key: str) -> Route:
        async def show(request: Request) -> Response:
            if console.actor(request) is None:
                return to_login(request)
            return render(console, request, "page.html", title=key)
        return Route(path, show, methods=["GET"], name=key)

    async def home(request: Request) -> Response:
        return RedirectResponse(HOME if console.actor(request) else "/login", 303)

    return [Route("/", home, methods=["GET"]),
            Route("/login", login_page, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/language", language, methods=["POST"]),
            *(page(path, key) for path, key in PAGES)]
