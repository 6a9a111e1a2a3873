"""What every console route needs: the settings, the sessions, the login and the
operations, and the three checks each request goes through (who, CSRF, which language)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import Response

from milters.core.config import ConsoleSettings
from milters.core.eventlog import log_event

from . import i18n
from .identity import Actor
from .sessions import COOKIE, Session, SessionStore

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


# (name, password, source) -> the Actor, or LoginRefused / LoginThrottled
# (mta.console.login.authenticate with its settings and Store bound).
Authenticator = Callable[[str, str, str], Actor]


@dataclass
class Console:
    settings: ConsoleSettings
    sessions: SessionStore
    authenticate: Authenticator
    operations: Any = None  # mta.operations.Operations; None: the pages say not yet
    reviews: Any = None  # mta.operations.review.ReviewOperations; None: no review pages

    def session(self, request: Request) -> Session | None:
        """The request's live session (looked up once per request)."""
        if not hasattr(request.state, "session"):
            session, why = self.sessions.find(request.cookies.get(COOKIE))
            if why == "expired":
                log_event("console_session_expired", source=source_of(request),
                          path=request.url.path)
            request.state.session = session
            request.state.session_ended = why == "expired"
        return request.state.session  # type: ignore[no-any-return]

    def actor(self, request: Request) -> Actor | None:
        session = self.session(request)
        return session.actor if session is not None else None

    def language(self, request: Request) -> str:
        session = self.session(request)
        return i18n.choose(session.language if session else None, self.settings.language,
                           request.headers.get("accept-language"))

    def csrf_refused(self, request: Request, token: str | None) -> bool:
        """True (and logged) when a state-changing request lacks its session's token."""
        session = self.session(request)
        if self.sessions.csrf_ok(session, token):
            return False
        actor = session.actor if session else None
        log_event("console_csrf_refused", level=logging.WARNING, source=source_of(request),
                  path=request.url.path, name=getattr(actor, "name", None),
                  reason="no session" if session is None else
                  ("no token" if not token else "wrong token"))
        return True

    def set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(COOKIE, self.sessions.cookie_value(session), path="/",
                            httponly=True, samesite="strict", secure=self.settings.tls)

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=self.settings.tls)


def source_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"
