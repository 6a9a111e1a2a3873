"""A Nextcloud stand-in on 127.0.0.1 for the offload tests (http.server in a thread).

    with NextcloudFake(user="mailmoat", app_password="app-pw") as cloud:
        client = NextcloudClient(NextcloudSettings(url=cloud.url, user="mailmoat"), "app-pw")
        ...
        assert cloud.files() == {"/mailmoat/a/b/見積書.pdf": b"..."}

What it speaks, as Nextcloud documents and does it:

- WebDAV under {prefix}/remote.php/dav/files/USER/...: PROPFIND (Depth 0 or 1; "infinity"
  is served as 1, as Nextcloud does unless told otherwise) with a 207 multistatus, MKCOL
  (201; 405 exists; 409 parent missing), PUT (201 created, 204 replaced; 404 parent
  missing; 507 over `quota`; 400 with Sabre's InvalidPath body for `.htaccess`, "\\" and
  control characters), GET, DELETE. Basic auth with the user id or its `login` alias and
  the app password, 401 with WWW-Authenticate otherwise. Another user's files do not exist.
- OCS share API under {prefix}/ocs/v2.php (and v1.php)/apps/files_sharing/api/v1/shares:
  POST creates a public link share (shareType 3 only), DELETE /shares/ID removes one.
  `format=json` or `Accept: application/json` gives JSON, XML otherwise. v2 puts the OCS
  status in the HTTP status (200 ok), v1 answers 200 with statuscode 100. Errors mirror
  ShareAPIController: 404 missing or unknown path, 404 malformed expireDate ("Invalid
  date..."), 404 a date today or earlier ("Expiration date is in the past"), 403 password
  shorter than `min_share_password` or missing with `enforce_password`, 401/997 without
  credentials or without the OCS-APIRequest header. `max_expire_days` caps expiry either
  as Nextcloud does (`expire_cap="refuse"`: 404 "Cannot set expiration date more than N
  days in the future") or by silently shortening it (`"shorten"`), to test the client.
- Public links: GET {prefix}/s/TOKEN (an HTML listing), GET /s/TOKEN/download?path=/&files=
  NAME, POST /s/TOKEN/authenticate (form field `password`, sets a cookie) and GET
  {prefix}/public.php/dav/files/TOKEN/NAME (basic auth "anonymous" + share password).
  Deviation for testability: a missing password answers 401 and a wrong one 403, where
  Nextcloud shows its password page with a 200.

Failure switches: `fail_next` (answer N requests with a status), `reply_next` (any status
and body), `delay_next` (sleep before answering), `drop_next` (close the connection without
a reply). Every request is recorded without its Authorization and Cookie headers, and the
share form with the password masked.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import secrets
import socket
import ssl
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape as xml_escape

from tests.harness.ports import LOOPBACK

DAV_PREFIX = "/remote.php/dav/files/"
PUBLIC_DAV_PREFIX = "/public.php/dav/files/"
SHARES_PATHS = {"/ocs/v2.php/apps/files_sharing/api/v1/shares": 2,
                "/ocs/v1.php/apps/files_sharing/api/v1/shares": 1}
HIDDEN_HEADERS = frozenset({"authorization", "cookie"})
FORBIDDEN_NAMES = frozenset({".htaccess"})  # Nextcloud's default forbidden_filenames
FORBIDDEN_CHARS = frozenset("\\")  # plus control characters, always
AUTH_COOKIE = "nc_share_auth"

Path = tuple[str, ...]  # decoded, NFC segments below the user's files root


@dataclass(frozen=True)
class FakeRequest:
    """One request as the fake saw it (no credentials)."""

    method: str
    path: str  # raw, still percent-encoded, without the query
    query: str
    headers: dict[str, str]
    body_size: int
    form: dict[str, str] = field(default_factory=dict)  # OCS form, password masked


@dataclass
class FakeShare:
    id: str
    token: str
    path: Path
    password: str
    expiration: datetime.date | None
    permissions: int
    is_folder: bool


@dataclass
class _Injection:
    kind: str  # "reply", "delay", "drop"
    method: str | None
    status: int = 500
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    seconds: float = 0.0


class _HTTPError(Exception):
    """Raised inside a handler to answer with a status and body."""

    def __init__(self, status: int, body: bytes, content_type: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


def _sabre_error(status: int, exception: str, message: str, extra: str = "",
                 headers: dict[str, str] | None = None) -> _HTTPError:
    """A WebDAV error body as Sabre (and so Nextcloud) writes it."""
    body = ('<?xml version="1.0" encoding="utf-8"?>\n'
            '<d:error xmlns:d="DAV:" xmlns:s="http://sabredav.org/ns">\n'
            f"  <s:exception>{xml_escape(exception)}</s:exception>\n"
            f"  <s:message>{xml_escape(message)}</s:message>\n{extra}</d:error>\n")
    return _HTTPError(status, body.encode(), "application/xml; charset=utf-8", headers)


def _invalid_path(message: str) -> _HTTPError:
    # InvalidPath adds o:retry and o:reason in the namespace "o:".
    extra = ('  <o:retry xmlns:o="o:">false</o:retry>\n'
             f'  <o:reason xmlns:o="o:">{xml_escape(message)}</o:reason>\n')
    return _sabre_error(400, "OCA\\DAV\\Connector\\Sabre\\Exception\\InvalidPath", message,
                        extra)


def _html(status: int, title: str, body: str = "",
          headers: dict[str, str] | None = None) -> _HTTPError:
    text = (f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return _HTTPError(status, text.encode(), "text/html; charset=utf-8", headers)


class NextcloudFake:
    """The fake server; all state is behind one lock, handlers run in their own threads."""

    def __init__(self, user: str = "mailmoat", app_password: str = "app-password-1234", *,
                 login: str | None = None, prefix: str = "", quota: int | None = None,
                 min_share_password: int = 0, enforce_password: bool = False,
                 max_expire_days: int | None = None, expire_cap: str = "refuse",
                 default_expire_days: int | None = None, federation: bool = True,
                 drop_share_password: bool = False, deny_writes: bool = False,
                 link_base: str | None = None, tls: tuple[str, str] | None = None,
                 today: Callable[[], datetime.date] = datetime.date.today) -> None:
        if expire_cap not in ("refuse", "shorten"):
            raise ValueError("expire_cap is 'refuse' or 'shorten'")
        self.user = user
        self.app_password = app_password
        self.login = login  # another name that logs in as `user` (an e-mail login)
        self.prefix = prefix.rstrip("/")
        self.quota = quota
        self.min_share_password = min_share_password
        self.enforce_password = enforce_password
        self.max_expire_days = max_expire_days
        self.expire_cap = expire_cap
        self.default_expire_days = default_expire_days
        self.federation = federation  # Nextcloud then adds "share" (16) to link shares
        self.drop_share_password = drop_share_password  # play a server that ignores it
        self.deny_writes = deny_writes  # play an access-control rule: 403 on writes
        self.link_base = link_base  # what share URLs start with, e.g. a wrong http://
        self.tls = tls  # (certfile, keyfile)
        self.today = today
        self.host = LOOPBACK
        self.port = 0
        self._lock = threading.Lock()
        self._nodes: dict[Path, bytes | None] = {(): None}  # None marks a folder
        self._mtimes: dict[Path, float] = {}
        self._shares: dict[str, FakeShare] = {}
        self._sessions: dict[str, str] = {}  # cookie value -> share token
        self._next_share_id = 1
        self._requests: list[FakeRequest] = []
        self._injections: list[_Injection] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}{self.prefix}"

    def start(self) -> NextcloudFake:
        # Port 0: the kernel picks a free port at bind time, so no race with free_port().
        server = _Server((self.host, 0), _Handler)
        server.fake = self
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            # The handshake happens in the handler's thread, not in the accept loop.
            server.socket = context.wrap_socket(server.socket, server_side=True,
                                                do_handshake_on_connect=False)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="nextcloud-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> NextcloudFake:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- failure switches ----------------------------------------------------------------------

    def reply_next(self, count: int, status: int, body: bytes = b"", *,
                   content_type: str = "text/plain; charset=utf-8",
                   method: str | None = None) -> None:
        """Answer the next `count` requests (of `method`, if given) with this reply."""
        self._inject(count, _Injection("reply", method, status, body, content_type))

    def fail_next(self, count: int, status: int = 500, *, method: str | None = None) -> None:
        body = f"Injected failure {status}".encode()
        self.reply_next(count, status, body, method=method)

    def delay_next(self, count: int, seconds: float, *, method: str | None = None) -> None:
        """Sleep before answering the next `count` requests (then answer them normally)."""
        self._inject(count, _Injection("delay", method, seconds=seconds))

    def drop_next(self, count: int, *, method: str | None = None) -> None:
        """Read the next `count` requests, then close the connection without a reply."""
        self._inject(count, _Injection("drop", method))

    def _inject(self, count: int, injection: _Injection) -> None:
        with self._lock:
            self._injections.extend([injection] * count)

    def _take_injection(self, method: str) -> _Injection | None:
        with self._lock:
            for index, injection in enumerate(self._injections):
                if injection.method in (None, method):
                    return self._injections.pop(index)
        return None

    # -- results -------------------------------------------------------------------------------

    @property
    def requests(self) -> list[FakeRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def files(self) -> dict[str, bytes]:
        """Every file of the user, by "/"-joined decoded path."""
        with self._lock:
            return {"/" + "/".join(p): d for p, d in self._nodes.items() if d is not None}

    def folders(self) -> list[str]:
        with self._lock:
            return sorted("/" + "/".join(p) for p, d in self._nodes.items() if d is None)

    @property
    def shares(self) -> list[FakeShare]:
        with self._lock:
            return list(self._shares.values())

    def add_file(self, path: str, data: bytes) -> None:
        """Put a file (and its folders) in place, as if uploaded earlier."""
        parts = tuple(unicodedata.normalize("NFC", p) for p in path.strip("/").split("/"))
        with self._lock:
            for depth in range(1, len(parts)):
                self._nodes.setdefault(parts[:depth], None)
            self._nodes[parts] = data
            self._mtimes[parts] = time.time()

    # -- called from handler threads -----------------------------------------------------------

    def _record(self, request: FakeRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _check_login(self, header: str | None) -> bool:
        creds = _basic(header)
        return (creds is not None and creds[0] in (self.user, self.login)
                and creds[1] == self.app_password)

    def _used(self) -> int:
        return sum(len(d) for d in self._nodes.values() if d is not None)


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        login, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return login, password


def _decode_segments(raw: str) -> Path:
    """Percent-decoded, NFC segments (Nextcloud stores names in NFC)."""
    parts = [p for p in raw.split("/") if p != ""]
    out = []
    for part in parts:
        try:
            name = unquote(part, errors="strict")
        except UnicodeDecodeError:
            raise _invalid_path(f'"{part}" is not UTF-8 once decoded.') from None
        if "/" in name or name in (".", ".."):
            raise _invalid_path(f'"{name}" is not a valid path segment.')
        out.append(unicodedata.normalize("NFC", name))
    return tuple(out)


def _check_name(name: str) -> None:
    """Nextcloud's FilenameValidator, in the default configuration."""
    if name.lower() in FORBIDDEN_NAMES:
        raise _invalid_path(f'"{name.lower()}" is a forbidden file or folder name.')
    for char in name:
        if char in FORBIDDEN_CHARS or ord(char) < 0x20 or ord(char) == 0x7f:
            raise _invalid_path(f'"{char}" is not allowed inside a file or folder name.')
    if len(name.encode()) > 250:
        raise _invalid_path("Filename is too long")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a delayed handler must not hold up stop()
    fake: NextcloudFake

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or drop are the point of some tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "NextcloudFake/1.0"
    timeout = 30  # idle keep-alive connections end instead of lingering
    server: _Server

    # -- plumbing ------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_MKCOL = do_PROPFIND = do_HEAD = do_GET

    @property
    def fake(self) -> NextcloudFake:
        return self.server.fake

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        query = parse_qs(split.query, keep_blank_values=True)
        injection = self.fake._take_injection(self.command)
        self.fake._record(self._recorded(split.path, split.query, body))
        if injection is not None and injection.kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if injection is not None and injection.kind == "delay":
            time.sleep(injection.seconds)
        try:
            if injection is not None and injection.kind == "reply":
                raise _HTTPError(injection.status, injection.body, injection.content_type)
            self._route(split.path, query, body)
        except _HTTPError as reply:
            self._send(reply.status, reply.body, reply.content_type, reply.headers)

    def _recorded(self, path: str, query: str, body: bytes) -> FakeRequest:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HIDDEN_HEADERS}
        form: dict[str, str] = {}
        if self.command == "POST" and "form-urlencoded" in self.headers.get("Content-Type", ""):
            parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            form = {k: ("***" if k == "password" else v[-1]) for k, v in parsed.items()}
        return FakeRequest(self.command, path, query, headers, len(body), form)

    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain",
              headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            if body or status not in (201, 204):
                self.send_header("Content-Type", content_type)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            self.close_connection = True  # the client gave up (timeout tests)

    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        prefix = self.fake.prefix
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            raise _html(404, "Page not found")
        path = path[len(prefix):]
        if path.startswith(DAV_PREFIX):
            self._dav(path[len(DAV_PREFIX):], body)
        elif path.rstrip("/") in SHARES_PATHS or any(
                path.startswith(p + "/") for p in SHARES_PATHS):
            self._ocs(path, query, body)
        elif path.startswith("/s/"):
            self._public(path[3:], query, body)
        elif path.startswith(PUBLIC_DAV_PREFIX):
            self._public_dav(path[len(PUBLIC_DAV_PREFIX):])
        else:
            raise _html(404, "Page not found")

    # -- WebDAV --------------------------------------------------------------------------------

    def _dav(self, rest: str, body: bytes) -> None:
        if not self.fake._check_login(self.headers.get("Authorization")):
            raise _sabre_error(
                401, "Sabre\\DAV\\Exception\\NotAuthenticated",
                "No public access to this resource., Username or password was incorrect",
                headers={"WWW-Authenticate": 'Basic realm="Nextcloud", charset="UTF-8"'})
        url_user, _, raw = rest.partition("/")
        url_user = unquote(url_user)
        path = _decode_segments(raw)
        own = url_user == self.fake.user  # another user's files do not exist for us
        method = self.command
        if method in ("PUT", "MKCOL", "DELETE") and self.fake.deny_writes:
            raise _sabre_error(403, "Sabre\\DAV\\Exception\\Forbidden",
                               "Access to this resource has been denied by access control")
        with self.fake._lock:
            if method == "MKCOL":
                reply = self._mkcol(own, path)
            elif method == "PUT":
                reply = self._put(own, path, body)
            elif method in ("GET", "HEAD"):
                reply = self._get(own, path)
            elif method == "PROPFIND":
                reply = self._propfind(own, url_user, path)
            elif method == "DELETE":
                reply = self._delete(own, path)
            else:
                reply = _sabre_error(501, "Sabre\\DAV\\Exception\\NotImplemented",
                                     f"There was no plugin in the system that was willing "
                                     f"to handle this {method} method.")
        raise reply

    def _node(self, own: bool, path: Path) -> bytes | None:
        if not own or path not in self.fake._nodes:
            raise _sabre_error(404, "Sabre\\DAV\\Exception\\NotFound",
                               f"File with name {'/'.join(path)} could not be located")
        return self.fake._nodes[path]

    def _mkcol(self, own: bool, path: Path) -> _HTTPError:
        nodes = self.fake._nodes
        if own and path in nodes:
            return _sabre_error(405, "Sabre\\DAV\\Exception\\MethodNotAllowed",
                                "The resource you tried to create already exists")
        if not own or path[:-1] not in nodes or nodes[path[:-1]] is not None:
            return _sabre_error(409, "Sabre\\DAV\\Exception\\Conflict",
                                "Parent node does not exist")
        _check_name(path[-1])
        nodes[path] = None
        self.fake._mtimes[path] = time.time()
        return _HTTPError(201, b"", "text/plain")

    def _put(self, own: bool, path: Path, body: bytes) -> _HTTPError:
        nodes = self.fake._nodes
        if not path:
            return _sabre_error(409, "Sabre\\DAV\\Exception\\Conflict",
                                "PUT is not allowed on non-files.")
        parent = path[:-1]
        if not own or parent not in nodes:
            return _sabre_error(404, "Sabre\\DAV\\Exception\\NotFound",
                                f"File with name {'/'.join(parent)} could not be located")
        if nodes[parent] is not None:
            return _sabre_error(409, "Sabre\\DAV\\Exception\\Conflict",
                                "Files can only be created as children of collections")
        _check_name(path[-1])
        old = nodes.get(path, b"")
        if old is None:
            return _sabre_error(409, "Sabre\\DAV\\Exception\\Conflict",
                                "PUT is not allowed on non-files.")
        quota = self.fake.quota
        if quota is not None:
            free = quota - (self.fake._used() - len(old))
            if len(body) > free:
                return _sabre_error(507, "Sabre\\DAV\\Exception\\InsufficientStorage",
                                    f"Insufficient space in /{'/'.join(path)}, {len(body)} "
                                    f"required, {max(free, 0)} available")
        created = path not in nodes
        nodes[path] = body
        self.fake._mtimes[path] = time.time()
        etag = '"' + hashlib.md5(body).hexdigest() + '"'
        headers = {"ETag": etag, "OC-Etag": etag, "OC-FileId": f"{len(nodes):08d}ocfake"}
        return _HTTPError(201 if created else 204, b"", "text/plain", headers)

    def _get(self, own: bool, path: Path) -> _HTTPError:
        data = self._node(own, path)
        if data is None:
            return _sabre_error(501, "Sabre\\DAV\\Exception\\NotImplemented",
                                "Folder downloads are not implemented by this fake")
        return _HTTPError(200, data, "application/octet-stream")

    def _delete(self, own: bool, path: Path) -> _HTTPError:
        self._node(own, path)
        if not path:
            return _sabre_error(403, "Sabre\\DAV\\Exception\\Forbidden",
                                "The user's root cannot be deleted")
        for key in [k for k in self.fake._nodes if k[:len(path)] == path]:
            del self.fake._nodes[key]
            self.fake._mtimes.pop(key, None)
        return _HTTPError(204, b"", "text/plain")

    def _propfind(self, own: bool, url_user: str, path: Path) -> _HTTPError:
        self._node(own, path)
        depth = self.headers.get("Depth", "infinity").strip().lower()
        targets = [path]
        if depth != "0":  # "1", and "infinity" served as 1
            targets += sorted(k for k in self.fake._nodes
                              if len(k) == len(path) + 1 and k[:len(path)] == path)
        base = f"{self.fake.prefix}{DAV_PREFIX}{quote(url_user, safe='')}"
        parts = ['<?xml version="1.0"?>\n<d:multistatus xmlns:d="DAV:" '
                 'xmlns:s="http://sabredav.org/ns" xmlns:oc="http://owncloud.org/ns">']
        for target in targets:
            data = self.fake._nodes[target]
            href = base + "".join("/" + quote(s, safe="") for s in target)
            mtime = formatdate(self.fake._mtimes.get(target, time.time()), usegmt=True)
            if data is None:
                href += "/"
                props = "<d:resourcetype><d:collection/></d:resourcetype>"
            else:
                props = ("<d:resourcetype/>"
                         f"<d:getcontentlength>{len(data)}</d:getcontentlength>"
                         "<d:getcontenttype>application/octet-stream</d:getcontenttype>"
                         f'<d:getetag>"{hashlib.md5(data).hexdigest()}"</d:getetag>')
            parts.append(f"<d:response><d:href>{xml_escape(href)}</d:href><d:propstat>"
                         f"<d:prop>{props}<d:getlastmodified>{mtime}</d:getlastmodified>"
                         "</d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat>"
                         "</d:response>")
        parts.append("</d:multistatus>\n")
        return _HTTPError(207, "".join(parts).encode(), "application/xml; charset=utf-8")

    # -- OCS -----------------------------------------------------------------------------------

    def _ocs(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        base = next(p for p in SHARES_PATHS if path.startswith(p))
        version = SHARES_PATHS[base]
        fmt = (query.get("format") or [""])[-1]
        as_json = fmt == "json" or (fmt != "xml"
                                    and "application/json" in self.headers.get("Accept", ""))
        try:
            if self.headers.get("OCS-APIRequest", "").lower() != "true":
                raise _OcsError(997, "CSRF check failed")
            if not self.fake._check_login(self.headers.get("Authorization")):
                raise _OcsError(997, "Current user is not logged in")
            share_id = path[len(base):].strip("/")
            if self.command == "POST" and not share_id:
                data: Any = self._create_share(self._form(body))
            elif self.command == "DELETE" and share_id:
                data = self._delete_share(share_id)
            else:
                raise _OcsError(404, "Invalid query, please check the syntax.")
            code, message = (200 if version == 2 else 100), "OK"
        except _OcsError as exc:
            code, message, data = exc.code, exc.message, []
        http = 200
        if code == 997:
            http = 401
        elif version == 2 and code not in (100, 200):
            http = code if 400 <= code < 600 else 400
        meta = {"status": "ok" if code in (100, 200) else "failure", "statuscode": code,
                "message": message, "totalitems": "", "itemsperpage": ""}
        if as_json:
            payload = json.dumps({"ocs": {"meta": meta, "data": data}}, ensure_ascii=False)
            raise _HTTPError(http, payload.encode(), "application/json; charset=utf-8")
        xml = ('<?xml version="1.0"?>\n<ocs>' + _xml_value("meta", meta)
               + _xml_value("data", data) + "</ocs>\n")
        raise _HTTPError(http, xml.encode(), "text/xml; charset=UTF-8")

    def _form(self, body: bytes) -> dict[str, str]:
        if "json" in self.headers.get("Content-Type", ""):
            try:
                return {k: str(v) for k, v in json.loads(body or b"{}").items()}
            except (ValueError, AttributeError):
                raise _OcsError(400, "Invalid JSON body") from None
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[-1] for k, v in parsed.items()}

    def _create_share(self, form: dict[str, str]) -> dict[str, Any]:
        fake = self.fake
        if "path" not in form:
            raise _OcsError(404, "Please specify a file or folder path")
        path = tuple(unicodedata.normalize("NFC", p)
                     for p in form["path"].strip("/").split("/") if p)
        with fake._lock:
            if path not in fake._nodes:
                raise _OcsError(404, "Wrong path, file/folder does not exist")
            is_folder = fake._nodes[path] is None
        try:
            share_type = int(form.get("shareType", "-1"))
            permissions = int(form["permissions"]) if form.get("permissions") else 1
        except ValueError:
            raise _OcsError(400, "Wrong parameters") from None
        if share_type != 3:
            raise _OcsError(400, "Unknown share type")  # the fake shares links only
        today = fake.today()
        expiration = self._expiration(form.get("expireDate"), today)
        password = form.get("password", "")
        if fake.enforce_password and not password:
            raise _OcsError(403, "Passwords are enforced for link and mail shares")
        if password and len(password) < fake.min_share_password:
            raise _OcsError(403, f"Password needs to be at least {fake.min_share_password} "
                                 "characters long.")
        if fake.federation and permissions & 1:
            permissions |= 16
        if not is_folder:
            permissions &= ~(4 | 8)  # single files never get create or delete
        with fake._lock:
            share = FakeShare(str(fake._next_share_id), _token(), path,
                              "" if fake.drop_share_password else password, expiration,
                              permissions, is_folder)
            fake._next_share_id += 1
            fake._shares[share.id] = share
        return self._format_share(share)

    def _expiration(self, text: str | None, today: datetime.date) -> datetime.date | None:
        fake = self.fake
        if text is None:  # absent: the server's default, if it has one
            if fake.default_expire_days is None:
                return None
            return today + datetime.timedelta(days=fake.default_expire_days)
        if text == "":
            return None
        try:
            date = datetime.date.fromisoformat(text)
            if len(text) != 10:
                raise ValueError(text)
        except ValueError:
            raise _OcsError(404, "Invalid date. Format must be YYYY-MM-DD") from None
        if date <= today:
            raise _OcsError(404, "Expiration date is in the past")
        if fake.max_expire_days is not None:
            cap = today + datetime.timedelta(days=fake.max_expire_days)
            if date > cap:
                if fake.expire_cap == "refuse":
                    raise _OcsError(404, "Cannot set expiration date more than "
                                         f"{fake.max_expire_days} days in the future")
                date = cap
        return date

    def _format_share(self, share: FakeShare) -> dict[str, Any]:
        fake = self.fake
        hashed = ("3|$argon2id$fake$" + hashlib.sha256(share.password.encode()).hexdigest()
                  if share.password else None)
        base = fake.link_base or fake.url
        return {
            "id": share.id, "share_type": 3, "uid_owner": fake.user,
            "displayname_owner": fake.user, "permissions": share.permissions,
            "stime": int(time.time()), "parent": None,
            "expiration": (share.expiration.isoformat() + " 00:00:00"
                           if share.expiration else None),
            "token": share.token, "uid_file_owner": fake.user,
            "path": "/" + "/".join(share.path),
            "item_type": "folder" if share.is_folder else "file",
            "file_target": "/" + (share.path[-1] if share.path else ""),
            "share_with": hashed, "share_with_displayname": "(Shared link)",
            "password": hashed, "send_password_by_talk": False,
            "url": f"{base}/s/{share.token}", "mail_send": 0, "hide_download": 0,
        }

    def _delete_share(self, share_id: str) -> list[Any]:
        with self.fake._lock:
            if self.fake._shares.pop(share_id, None) is None:
                raise _OcsError(404, "Wrong share ID, share does not exist")
        return []

    # -- public links --------------------------------------------------------------------------

    def _share_for(self, token: str) -> FakeShare:
        with self.fake._lock:
            share = next((s for s in self.fake._shares.values() if s.token == token), None)
        if share is None or (share.expiration is not None
                             and share.expiration <= self.fake.today()):
            raise _html(404, "Share not found")
        return share

    def _authorized(self, share: FakeShare) -> bool:
        """True for no password, the right password, or a session from /authenticate.

        Raises 401 when no credentials came and 403 when wrong ones did."""
        if not share.password:
            return True
        cookies = self.headers.get("Cookie", "")
        for part in cookies.split(";"):
            key, _, value = part.strip().partition("=")
            if key == AUTH_COOKIE:
                with self.fake._lock:
                    if self.fake._sessions.get(value) == share.token:
                        return True
        creds = _basic(self.headers.get("Authorization"))
        if creds is None:
            form = (f'<form method="post" action="{self.fake.prefix}/s/{share.token}'
                    '/authenticate/showShare"><input type="password" name="password">'
                    '<input type="submit"></form>')
            raise _html(401, "This share is password-protected", form,
                        {"WWW-Authenticate": 'Basic realm="Nextcloud share"'})
        if not secrets.compare_digest(creds[1].encode(), share.password.encode()):
            raise _html(403, "The password is wrong. Try again.")
        return True

    def _public(self, rest: str, query: dict[str, list[str]], body: bytes) -> None:
        token, _, action = rest.partition("/")
        share = self._share_for(token)
        if action.startswith("authenticate"):
            if self.command != "POST":
                raise _html(405, "Method not allowed")
            password = (parse_qs(body.decode("utf-8", "replace")).get("password") or [""])[-1]
            if not secrets.compare_digest(password.encode(), share.password.encode()):
                raise _html(403, "The password is wrong. Try again.")
            session = secrets.token_urlsafe(16)
            with self.fake._lock:
                self.fake._sessions[session] = share.token
            raise _HTTPError(303, b"", "text/plain", {
                "Location": f"{self.fake.prefix}/s/{share.token}",
                "Set-Cookie": f"{AUTH_COOKIE}={session}; Path=/; HttpOnly"})
        if self.command not in ("GET", "HEAD"):
            raise _html(405, "Method not allowed")
        self._authorized(share)
        if action == "download":
            raise self._download(share, query)
        if action:
            raise _html(404, "Page not found")
        raise self._listing(share)

    def _download(self, share: FakeShare, query: dict[str, list[str]]) -> _HTTPError:
        """/s/TOKEN/download: the shared file, or ?path=/SUB&files=NAME in a shared folder."""
        if share.is_folder:
            name = (query.get("files") or [""])[-1]
            if not name:
                return _html(501, "Folder downloads (ZIP) are not implemented by this fake")
            # parse_qs already decoded the query: split, do not decode again.
            sub = tuple(unicodedata.normalize("NFC", p)
                        for p in (query.get("path") or ["/"])[-1].split("/") if p)
            if ".." in sub or "." in sub:
                return _html(400, "Invalid path")
            target = share.path + sub + (unicodedata.normalize("NFC", name),)
        else:
            target = share.path
        with self.fake._lock:
            data = self.fake._nodes.get(target)
        if data is None:
            return _html(404, "File not found")
        disposition = f"attachment; filename*=UTF-8''{quote(target[-1], safe='')}"
        return _HTTPError(200, data, "application/octet-stream",
                          {"Content-Disposition": disposition})

    def _listing(self, share: FakeShare) -> _HTTPError:
        with self.fake._lock:
            if share.is_folder:
                names = sorted(k[-1] for k, d in self.fake._nodes.items()
                               if d is not None and k[:-1] == share.path)
            else:
                names = [share.path[-1]]
        link = f"{self.fake.prefix}/s/{share.token}/download"
        items = []
        for name in names:
            href = (f"{link}?path=%2F&files={quote(name, safe='')}" if share.is_folder
                    else link)
            items.append(f'<li><a href="{html.escape(href)}">{html.escape(name)}</a></li>')
        return _html(200, share.path[-1] if share.path else "share",
                     "<ul>" + "".join(items) + "</ul>")

    def _public_dav(self, rest: str) -> None:
        token, _, raw = rest.partition("/")
        share = self._share_for(token)
        creds = _basic(self.headers.get("Authorization"))
        if share.password and (creds is None or creds[0] != "anonymous"
                               or creds[1] != share.password):
            raise _sabre_error(401, "Sabre\\DAV\\Exception\\NotAuthenticated",
                               "Password is required",
                               headers={"WWW-Authenticate": 'Basic realm="Nextcloud"'})
        if self.command not in ("GET", "HEAD"):
            raise _sabre_error(405, "Sabre\\DAV\\Exception\\MethodNotAllowed",
                               "Only GET is implemented by this fake on public links")
        path = share.path + _decode_segments(raw) if share.is_folder else share.path
        with self.fake._lock:
            data = self.fake._nodes.get(path)
        if data is None:
            raise _sabre_error(404, "Sabre\\DAV\\Exception\\NotFound",
                               f"File with name {'/'.join(path)} could not be located")
        raise _HTTPError(200, data, "application/octet-stream")


class _OcsError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _token() -> str:
    alphabet = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "".join(secrets.choice(alphabet) for _ in range(15))


def _xml_value(tag: str, value: Any) -> str:
    """OCS's XML: dicts as elements, lists as <element>, None as an empty element."""
    if isinstance(value, dict):
        inner = "".join(_xml_value(k, v) for k, v in value.items())
    elif isinstance(value, list):
        inner = "".join(_xml_value("element", v) for v in value)
    elif value is None:
        return f"<{tag}/>"
    elif isinstance(value, bool):
        inner = "1" if value else ""
    else:
        inner = xml_escape(str(value))
    return f"<{tag}>{inner}</{tag}>"
