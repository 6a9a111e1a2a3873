"""Nextcloud offload for the attachments milter: WebDAV uploads and one OCS link share.

A message's attachments go into a folder of their own,

    PUT  {url}/remote.php/dav/files/{user}/mailmoat/{sender}/{date}-{id}/{name}

and that folder gets ONE public link share (shareType=3) with a password and an explicit
expireDate, through POST {url}/ocs/v2.php/apps/files_sharing/api/v1/shares (header
`OCS-APIRequest: true`, `format=json`). The reply is checked rather than trusted: a share
whose expiry, password or permissions differ from what we asked is deleted and refused.

Why one share for the folder and not one per file: the recipient types the password once
(Nextcloud remembers it per share in the browser session, so N shares mean N prompts), the
note carries one link, and it is one OCS call to fail or succeed. The folder holds this
message's files only (its name carries a message token, and a folder that already holds
other files is refused), so the link exposes nothing else. Every Share returned carries the
folder link; `name` says which attachment it stands for.

Nextcloud stops serving a link at 00:00 of its expiration date (server time): a share made
on the 1st with expire_days=7 works through the 7th.

Errors are NextcloudError with `transient` (the same request may work later: 5xx other than
507, 423, 429, timeouts, refused or dropped connections) and `status` (HTTP, None when there
was no reply). 507 (quota or disk full) is NOT transient: it stays full until someone frees
space, so deferring mail for it only piles up the queue; the caller should fall back and an
operator be told. Neither password ever appears in an exception text or a log line.
"""
from __future__ import annotations

import datetime
import re
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from milters.core.errors import MailmoatError
from milters.core.eventlog import log_event
from milters.core.secrets import SecretSource, read_secret

if TYPE_CHECKING:
    import requests

# `requests` is imported by the client itself: the policy (settings, folder names) needs
# this module in every process that reads a policy, and only offloading needs HTTP.

SHARES_API = "/ocs/v2.php/apps/files_sharing/api/v1/shares"
DAV_FILES = "/remote.php/dav/files/"
SHARE_TYPE_LINK = 3
PERMISSION_READ = 1
# Nextcloud adds "share" (16) to link shares by itself when federated sharing is on.
PERMISSION_SHARE = 16
OCS_OK = (100, 200)  # OCS v1 said 100, v2 says 200
OCS_NOT_LOGGED_IN = 997
RETRY_STATUSES = frozenset({500, 502, 503, 504})
MAX_REASON = 200  # characters of a server's own explanation kept in a message
FOLDER_PLACEHOLDERS = ("sender", "date", "id")

_DAV = "{DAV:}"
_SABRE = "{http://sabredav.org/ns}"
_PROPFIND_BODY = (b'<?xml version="1.0" encoding="utf-8"?>'
                  b'<d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/></d:prop></d:propfind>')
# Folder tokens keep to characters every Nextcloud (and its Windows sync clients) accepts.
_UNSAFE_TOKEN = re.compile(r"[^A-Za-z0-9@._+-]+")
MAX_TOKEN = 64


@dataclass(frozen=True)
class NextcloudSettings:
    url: str  # https://cloud.example.jp, or with a sub-path: https://example.jp/nextcloud
    user: str  # the Nextcloud user id: it is also the WebDAV path's user
    password_env: str = ""  # an environment variable holding the app password ...
    password_file: str = ""  # ... or a file holding it; exactly one of the two
    ca_file: str = ""  # a CA bundle for a private CA; TLS verification is always on
    timeout: float = 30.0  # seconds, for connecting and for each read
    retries: int = 2  # more tries on 500/502/503/504 and connection failures
    folder: str = "mailmoat/{sender}/{date}-{id}"
    expire_days: int = 7
    permissions: int = PERMISSION_READ


@dataclass(frozen=True)
class Share:
    name: str  # the attachment's name as stored (NFC)
    url: str  # the public link of the message's folder
    expires: datetime.date  # the link stops working at 00:00 of this day (server time)


class NextcloudError(MailmoatError):
    """Nextcloud refused or failed; `transient` says whether trying later may work."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None,
                 name: str | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.name = name  # the attachment concerned, when there is one


# -- configuration -----------------------------------------------------------------------------

def load_app_password(settings: NextcloudSettings,
                      environ: Mapping[str, str] | None = None) -> str:
    """The app password from the environment variable or the file named in the settings
    (core.secrets: a file readable by every user is refused)."""
    return read_secret(SecretSource(settings.password_env, settings.password_file),
                       "nextcloud", environ=environ)


def check_folder_template(template: str) -> str | None:
    """A problem with a `folder` template, or None when it renders to a usable path."""
    try:
        message_folder(template, "sender@example.jp", "id", datetime.date(2000, 1, 1))
    except ValueError as exc:
        return str(exc)
    return None


# -- folder names ------------------------------------------------------------------------------

def path_token(text: str, fallback: str) -> str:
    """One safe path segment from hostile text: no separators, no dot-only or hidden names."""
    text = unicodedata.normalize("NFKC", text)
    token = _UNSAFE_TOKEN.sub("_", text).strip("._")[:MAX_TOKEN].rstrip(".")
    return token or fallback


def message_folder(template: str, sender: str, message_id: str, day: datetime.date) -> str:
    """The folder for one message, e.g. "mailmoat/taro@example.jp/20260401-4F2A1C"."""
    values = {
        # Lower case: one folder per mailbox whatever case the sender's client used.
        "sender": path_token(sender.strip().strip("<>").lower(), "unknown-sender"),
        "date": day.strftime("%Y%m%d"),
        "id": path_token(message_id, "message"),
    }
    try:
        folder = template.format_map(values)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"folder template {template!r}: unknown or broken placeholder {exc}; "
                         f"use {', '.join('{' + p + '}' for p in FOLDER_PLACEHOLDERS)}") from None
    return "/".join(folder_segments(folder))


def folder_segments(folder: str) -> list[str]:
    """The folder's segments; ValueError for an empty path, an empty, "." or ".." segment."""
    segments = folder.strip("/").split("/")
    if segments == [""]:
        raise ValueError("the Nextcloud folder is empty: files would land in the user's root")
    for segment in segments:
        if segment.strip() in ("", ".", ".."):
            raise ValueError(f"Nextcloud folder {folder!r} has an empty, '.' or '..' segment")
    return [unicodedata.normalize("NFC", s) for s in segments]


def expiry_for(settings: NextcloudSettings, today: datetime.date) -> datetime.date:
    return today + datetime.timedelta(days=settings.expire_days)


def _checked_files(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """NFC names (what Nextcloud stores), each a single segment, no duplicates."""
    seen: set[str] = set()
    out: list[tuple[str, bytes]] = []
    for name, data in files:
        name = unicodedata.normalize("NFC", name)
        if name in ("", ".", "..") or "/" in name:
            raise ValueError(f"attachment name {name!r} is not a single file name")
        if name in seen:
            raise ValueError(f"attachment name {name!r} appears twice: the second would "
                             "replace the first")
        seen.add(name)
        out.append((name, data))
    if not out:
        raise ValueError("no files to upload")
    return out


# -- text from servers -------------------------------------------------------------------------

def _scrub(text: str, secrets: Iterable[str]) -> str:
    """Server text goes into messages and logs: mask any secret a server might echo."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


def _dav_reason(resp: requests.Response) -> str:
    """Sabre's <s:message> from a WebDAV error body, "" when there is none."""
    if "xml" not in resp.headers.get("Content-Type", ""):
        return ""
    try:
        root = ET.fromstring(resp.content)
    except ET.ParseError:
        return ""
    return (root.findtext(f"{_SABRE}message") or "").strip()


def _http_problem(status: int, name: str | None) -> tuple[str, bool]:
    """What an HTTP status means for us, and whether it is transient."""
    if status == 400 and name is not None:
        return "Nextcloud refused the file name", False
    known = {
        400: ("bad request", False),
        401: ("authentication failed: check the user and the app password", False),
        403: ("forbidden: the user may not write there (or an access rule blocks it)", False),
        404: ("not found: check the user id and the folder", False),
        409: ("conflict: a parent folder is missing or is a file", False),
        413: ("too large for Nextcloud or a proxy in front of it", False),
        423: ("locked", True),
        429: ("rate limited (Nextcloud's brute-force protection?)", True),
        507: ("insufficient storage: the user's quota or the server's disk is full", False),
    }
    if status in known:
        return known[status]
    if 300 <= status < 400:
        return "unexpected redirect: check the url (scheme, host, sub-path)", False
    if status >= 500:
        return "server error", True
    return "unexpected reply", False


# -- the client --------------------------------------------------------------------------------

class NextcloudClient:
    """Uploads one message's attachments and shares them.

    It keeps no state between calls but its requests.Session (connection reuse), which
    requests does not document as thread-safe: one client per milter thread.
    """

    def __init__(self, settings: NextcloudSettings, password: str,
                 session: requests.Session | None = None, *, backoff: float = 0.5) -> None:
        if not password:
            raise ValueError("the Nextcloud app password is empty")
        self.settings = settings
        self._auth = (settings.user, password)
        self._own_session = session is None
        import requests
        self._session = session if session is not None else requests.Session()
        self._backoff = backoff
        self._base = settings.url.rstrip("/")
        self._dav_root = f"{self._base}{DAV_FILES}{quote(settings.user, safe='')}"

    def __repr__(self) -> str:  # never the password
        return f"NextcloudClient(url={self._base!r}, user={self.settings.user!r})"

    def close(self) -> None:
        if self._own_session:
            self._session.close()

    def __enter__(self) -> NextcloudClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the one operation -------------------------------------------------------------------

    def upload_and_share(self, files: list[tuple[str, bytes]], folder: str,
                         share_password: str, expire: datetime.date) -> list[Share]:
        """Upload the files into `folder`, share it; one Share per file, all with its link."""
        if not share_password:
            raise ValueError("a share password is required")
        named = _checked_files(files)
        segments = folder_segments(folder)
        secrets = (self._auth[1], share_password)
        self._make_folder(segments, {name for name, _ in named}, secrets)
        for name, data in named:
            self._put(segments, name, data, secrets)
        url = self._share(segments, share_password, expire, secrets)
        return [Share(name, url, expire) for name, _ in named]

    # -- WebDAV ------------------------------------------------------------------------------

    def _dav_url(self, segments: list[str]) -> str:
        # Each segment percent-encoded on its own (UTF-8): "#", "%", "?" and spaces stay
        # part of the name instead of ending or escaping the path.
        return self._dav_root + "".join("/" + quote(s, safe="") for s in segments)

    def _make_folder(self, segments: list[str], names: set[str],
                     secrets: tuple[str, ...]) -> None:
        """Create the message folder; its parents only when missing (one MKCOL usually)."""
        status = self._mkcol(segments, secrets)
        if status == 409:  # a parent is missing: walk down from the top
            for depth in range(1, len(segments) + 1):
                status = self._mkcol(segments[:depth], secrets)
                if status == 409:
                    where = ("the user's files root does not exist: is "
                             f"{self.settings.user!r} the Nextcloud user id (not a login "
                             "name or e-mail)?") if depth == 1 else "a parent folder vanished"
                    raise NextcloudError(f"creating folder {'/'.join(segments[:depth])}: "
                                         f"HTTP 409, {where}", transient=False, status=409)
        if status == 405:
            self._check_reusable(segments, names, secrets)

    def _mkcol(self, segments: list[str], secrets: tuple[str, ...]) -> int:
        """201 created, 405 already there, 409 parent missing; raises for anything else."""
        path = "/".join(segments)
        resp = self._request("MKCOL", self._dav_url(segments), f"creating folder {path}",
                             secrets)
        if resp.status_code in (201, 405, 409):
            return resp.status_code
        raise self._http_error(resp, f"creating folder {path}", secrets)

    def _check_reusable(self, segments: list[str], names: set[str],
                        secrets: tuple[str, ...]) -> None:
        """An existing message folder is only reused when it holds nothing but our names
        (a retry of the same message): sharing it must not expose anyone else's files."""
        path = "/".join(segments)
        what = f"looking into existing folder {path}"
        url = self._dav_url(segments)
        resp = self._request("PROPFIND", url, what, secrets, data=_PROPFIND_BODY,
                             headers={"Depth": "1",
                                      "Content-Type": "application/xml; charset=utf-8"})
        if resp.status_code != 207:
            raise self._http_error(resp, what, secrets)
        try:
            root = ET.fromstring(resp.content)
        except ET.ParseError:
            raise NextcloudError(f"{what}: the PROPFIND reply is not XML", transient=False,
                                 status=207) from None
        own = unquote(urlsplit(url).path).rstrip("/")
        others: list[str] = []
        for response in root.iter(f"{_DAV}response"):
            href = unquote(urlsplit(response.findtext(f"{_DAV}href") or "").path).rstrip("/")
            is_folder = response.find(f".//{_DAV}resourcetype/{_DAV}collection") is not None
            if href == own:
                if not is_folder:
                    raise NextcloudError(f"{what}: {path} exists and is a file",
                                         transient=False, status=405)
                continue
            child = unicodedata.normalize("NFC", href.rsplit("/", 1)[-1])
            if is_folder or child not in names:
                others.append(child)
        if others:
            shown = ", ".join(repr(n) for n in sorted(others)[:5])
            raise NextcloudError(f"folder {path} already holds other files ({shown}); "
                                 "refusing to share it", transient=False, status=405)

    def _put(self, segments: list[str], name: str, data: bytes,
             secrets: tuple[str, ...]) -> None:
        what = f"uploading {name!r} to {'/'.join(segments)}"
        resp = self._request("PUT", self._dav_url([*segments, name]), what, secrets,
                             data=data, headers={"Content-Type": "application/octet-stream"})
        if resp.status_code not in (201, 204):  # created, replaced
            raise self._http_error(resp, what, secrets, name=name)

    # -- OCS share ---------------------------------------------------------------------------

    def _share(self, segments: list[str], share_password: str, expire: datetime.date,
               secrets: tuple[str, ...]) -> str:
        path = "/" + "/".join(segments)
        what = f"sharing {path}"
        form = {
            "path": path,
            "shareType": str(SHARE_TYPE_LINK),
            "password": share_password,
            # Always explicit: an absent expireDate means the server's default, or none.
            "expireDate": expire.isoformat(),
            "permissions": str(self.settings.permissions),
        }
        resp = self._request("POST", self._base + SHARES_API, what, secrets, data=form,
                             params={"format": "json"}, headers=self._ocs_headers())
        data = self._ocs_data(resp, what, secrets)
        try:
            return self._checked_link(data, path, expire, what)
        except NextcloudError:
            # A link whose terms we did not choose must not outlive the refusal.
            self._delete_share(data.get("id"), secrets)
            raise

    def _ocs_headers(self) -> dict[str, str]:
        return {"OCS-APIRequest": "true", "Accept": "application/json"}

    def _ocs_data(self, resp: requests.Response, what: str,
                  secrets: tuple[str, ...]) -> dict[str, Any]:
        """`ocs.data` of a successful reply; NextcloudError for any OCS or HTTP failure."""
        status = resp.status_code
        if 300 <= status < 400:
            raise self._http_error(resp, what, secrets)
        try:
            meta = resp.json()["ocs"]["meta"]
            code = int(meta["statuscode"])
            message = _short(_scrub(str(meta.get("message") or ""), secrets))
        except (ValueError, TypeError, KeyError):
            if status == 401 or status >= 500:
                raise self._http_error(resp, what, secrets) from None
            ctype = resp.headers.get("Content-Type", "none")
            raise NextcloudError(f"{what}: HTTP {status}, not an OCS JSON reply "
                                 f"(Content-Type {ctype}): is the url Nextcloud's?",
                                 transient=False, status=status) from None
        if code in OCS_OK and status == 200:
            data = resp.json()["ocs"].get("data")
            if not isinstance(data, dict):
                raise NextcloudError(f"{what}: the OCS reply has no share data",
                                     transient=False, status=status)
            return data
        if code == OCS_NOT_LOGGED_IN or status == 401:
            problem, transient = _http_problem(401, None)
        elif code in (400, 403, 404):
            # Nextcloud's own words say which: password policy, date in the past, beyond
            # the enforced maximum, wrong path, link sharing disabled ...
            problem, transient = {400: "bad request", 403: "refused (forbidden)",
                                  404: "refused"}[code], False
        elif status >= 500:
            problem, transient = "server error", True
        else:
            problem, transient = "unexpected OCS status", False
        detail = f": {message}" if message else ""
        raise NextcloudError(f"{what}: OCS {code} (HTTP {status}) {problem}{detail}",
                             transient=transient, status=status)

    def _checked_link(self, data: dict[str, Any], path: str, expire: datetime.date,
                      what: str) -> str:
        """The share's link, once the reply shows the share is the one we asked for."""
        def refuse(problem: str) -> NextcloudError:
            return NextcloudError(f"{what}: {problem}; the share was deleted",
                                  transient=False, status=200)

        if str(data.get("share_type")) != str(SHARE_TYPE_LINK):
            raise refuse(f"the server made share type {data.get('share_type')!r}, not a "
                         "public link")
        got_path = unicodedata.normalize("NFC", str(data.get("path") or "")).rstrip("/")
        if got_path != path:
            raise refuse(f"the server shared {got_path!r}, not {path!r}")
        expiration = data.get("expiration")  # "YYYY-MM-DD 00:00:00" or null
        got = str(expiration)[:10] if expiration else "none"
        if got != expire.isoformat():
            raise refuse(f"the server set the expiry to {got}, we asked for "
                         f"{expire.isoformat()} (a sharing policy caps it?)")
        # The reply carries the password's hash; "share_with" held it before Nextcloud 15.
        if not (data.get("password") or data.get("share_with")):
            raise refuse("the share has no password")
        try:
            permissions = int(data.get("permissions"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise refuse(f"unreadable permissions {data.get('permissions')!r}") from None
        asked = self.settings.permissions
        if permissions & ~(asked | PERMISSION_SHARE) or permissions & asked != asked:
            raise refuse(f"the share has permissions {permissions}, we asked for {asked}")
        url = str(data.get("url") or "")
        if not url.startswith(("https://", "http://")):
            raise refuse(f"no usable link in the reply ({url!r})")
        if url.startswith("http://") and self._base.startswith("https://"):
            raise refuse(f"the server gave an http:// link ({url}): set overwriteprotocol "
                         "to https in Nextcloud's config.php")
        return url

    def _delete_share(self, share_id: Any, secrets: tuple[str, ...]) -> None:
        """Best effort: the refusal is what the caller needs to hear about."""
        if share_id in (None, ""):
            return
        what = f"deleting share {share_id}"
        url = f"{self._base}{SHARES_API}/{quote(str(share_id), safe='')}"
        try:
            resp = self._request("DELETE", url, what, secrets, params={"format": "json"},
                                 headers=self._ocs_headers())
            self._ocs_data(resp, what, secrets)
        except NextcloudError as exc:
            log_event("nextcloud_share_not_deleted", share=str(share_id), error=str(exc))

    # -- HTTP --------------------------------------------------------------------------------

    def _request(self, method: str, url: str, what: str, secrets: tuple[str, ...],
                 **kwargs: Any) -> requests.Response:
        """One request, tried again on 500/502/503/504 and on connection failures.

        Read timeouts are not retried: the server is up but slow, and another full wait
        would blow the milter's time budget (a PUT may have landed anyway).
        """
        import requests
        attempts = 1 + max(0, self.settings.retries)
        for attempt in range(1, attempts + 1):
            try:
                resp = self._session.request(
                    method, url, auth=self._auth, timeout=self.settings.timeout,
                    verify=self.settings.ca_file or True,
                    # A redirect would turn a POST into a GET; report it instead.
                    allow_redirects=False, **kwargs)
            except requests.exceptions.SSLError as exc:
                raise NextcloudError(
                    f"{what}: TLS failed (certificate not trusted? set ca_file for a "
                    f"private CA): {_short(_scrub(str(exc), secrets))}",
                    transient=False) from exc
            except (requests.exceptions.ConnectionError,
                    requests.exceptions.ChunkedEncodingError) as exc:
                error = _short(_scrub(str(exc), secrets))
                if attempt < attempts:
                    self._pause(method, url, attempt, error)
                    continue
                raise NextcloudError(f"{what}: cannot reach Nextcloud after {attempts} "
                                     f"tries: {error}", transient=True) from exc
            except requests.exceptions.Timeout as exc:
                raise NextcloudError(f"{what}: timed out after {self.settings.timeout:g} s",
                                     transient=True) from exc
            except requests.exceptions.RequestException as exc:
                raise NextcloudError(f"{what}: {_short(_scrub(str(exc), secrets))}",
                                     transient=False) from exc
            if resp.status_code in RETRY_STATUSES and attempt < attempts:
                resp.close()
                self._pause(method, url, attempt, f"HTTP {resp.status_code}")
                continue
            return resp
        raise AssertionError("unreachable")  # the loop returns or raises

    def _pause(self, method: str, url: str, attempt: int, error: str) -> None:
        log_event("nextcloud_retry", method=method, path=unquote(urlsplit(url).path),
                  attempt=attempt, error=error)
        time.sleep(self._backoff * 2 ** (attempt - 1))

    def _http_error(self, resp: requests.Response, what: str, secrets: tuple[str, ...],
                    name: str | None = None) -> NextcloudError:
        status = resp.status_code
        problem, transient = _http_problem(status, name)
        reason = _short(_scrub(_dav_reason(resp), secrets))
        if 300 <= status < 400:
            reason = f"to {resp.headers.get('Location', '?')}"
        detail = f" ({reason})" if reason else ""
        return NextcloudError(f"{what}: HTTP {status} {problem}{detail}",
                              transient=transient, status=status, name=name)
