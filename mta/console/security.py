"""Headers every console response carries, set in one place (an ASGI middleware), so no
route can forget them: a strict Content-Security-Policy (no inline script, no plugins, no
framing), nosniff, no Referer, and no caching of anything but the static files."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = ("default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    (b"cross-origin-opener-policy", b"same-origin"),
]
STATIC_PREFIX = "/static/"


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, tls: bool) -> None:
        self.app, self.tls = app, tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(STATIC_PREFIX)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {b"cache-control"}
                names.update(name for name, _ in HEADERS)
                headers = [(n, v) for n, v in message.get("headers", [])
                           if n.lower() not in names]
                headers += HEADERS
                # Pages show mail and who may see it: never kept by a browser or a proxy.
                headers.append((b"cache-control",
                                b"public, max-age=3600" if static else b"no-store"))
                if self.tls:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
