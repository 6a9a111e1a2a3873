"""Console sessions: a random ID in a signed cookie, the session itself in this process.

The cookie holds only the ID, signed with the key of `console.secret_key_file` (a cookie
that was not made here is refused before any lookup). Keeping the session on the server,
not in the cookie, is what lets logout and expiry end it for good: a copied cookie is
worthless once its session is gone. A console restart ends every session (log in again).
"""
from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from itsdangerous import BadSignature, Signer

from milters.core.secrets import signing_key

COOKIE = "mailmoat_session"
KEY_BYTES = 32
MAX_SESSIONS = 10_000  # a flood of anonymous logins pages evicts the oldest, never grows


@dataclass
class Session:
    id: str
    csrf: str  # the token every form and API POST of this session must carry
    created: float
    last: float
    actor: Any = None  # mta.console.identity.Actor once logged in; None: the login page's
    language: str | None = None  # the user's own choice, over the browser's


def load_secret_key(path: Path) -> bytes:
    """The session cookies' signing key (console.secret_key_file): read, or made 0600."""
    return signing_key(path, "console.secret_key_file", KEY_BYTES)


@dataclass
class SessionStore:
    key: bytes
    idle: float
    lifetime: float
    clock: Callable[[], float] = time.time
    _sessions: "OrderedDict[str, Session]" = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self._signer = Signer(self.key, salt="mailmoat-console-session")

    def new(self, actor: Any = None, language: str | None = None) -> Session:
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now,
                          actor, language)
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def cookie_value(self, session: Session) -> str:
        return self._signer.sign(session.id.encode("ascii")).decode("ascii")

    def find(self, cookie: str | None) -> tuple[Session | None, str | None]:
        """The live session a cookie names, touched; else None and why (for the log)."""
        if not cookie:
            return None, None
        try:
            session_id = self._signer.unsign(cookie.encode("ascii", "replace")).decode("ascii")
        except (BadSignature, UnicodeError):
            return None, "bad signature"
        session = self._sessions.get(session_id)
        if session is None:
            return None, "unknown or ended"
        now = self.clock()
        if now - session.last > self.idle or now - session.created > self.lifetime:
            self.end(session)
            return None, "expired"
        session.last = now
        self._sessions.move_to_end(session.id)
        return session, None

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def csrf_ok(self, session: Session | None, token: str | None) -> bool:
        if session is None or not token:
            return False
        return hmac.compare_digest(session.csrf.encode(), token.encode("utf-8", "replace"))
