"""The console's web layer without a browser (Starlette's TestClient against the real app):
CSRF, the headers of every route, the cookie, session expiry and logout, forged cookies,
the language choice under hostile Accept-Language headers, and the listen/TLS refusals."""
from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Iterator

import pytest
from starlette.testclient import TestClient

from milters.core.config import ConsoleSettings, load_config
from milters.core.errors import ConfigError, LoginRefused, MailmoatError
from mta.console import i18n, sessions
from mta.console.app import create_app
from mta.console.security import CSP
from mta.console.sessions import COOKIE, load_secret_key
from mta.console.identity import Actor
from tests.harness.console_login import StandInLogin

KEY = b"0123456789abcdef" * 4
ALICE = {"name": "alice", "password": "alice-pass-2026"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def login() -> StandInLogin:
    return StandInLogin()


def make_client(clock: Clock, login: StandInLogin, settings: ConsoleSettings | None = None,
                key: bytes = KEY, https: bool = False) -> TestClient:
    app = create_app(settings or ConsoleSettings(), key=key, authenticate=login, clock=clock)
    return TestClient(app, base_url="https://127.0.0.1" if https else "http://127.0.0.1")


@pytest.fixture
def client(clock: Clock, login: StandInLogin) -> Iterator[TestClient]:
    with make_client(clock, login) as test_client:
        yield test_client


def form_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def log_in(client: TestClient, who: dict[str, str] = ALICE) -> str:
    """Logs in through the form; returns the session's CSRF token."""
    token = form_token(client.get("/login").text)
    reply = client.post("/login", data={"csrf_token": token, **who}, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/held", reply.text
    return form_token(client.get("/held").text)


# -- CSRF --------------------------------------------------------------------------------------
def test_a_login_form_posted_without_its_token_is_refused_and_logged(
        client: TestClient, login: StandInLogin, caplog: pytest.LogCaptureFixture) -> None:
    client.get("/login")
    with caplog.at_level(logging.INFO, logger="mailmoat"):
        reply = client.post("/login", data=ALICE, follow_redirects=False)
    assert reply.status_code == 403
    assert login.calls == []  # the password was never even tried
    assert "event=console_csrf_refused" in caplog.text and "reason=\"no token\"" in caplog.text
    assert client.get("/api/me").status_code == 401


def test_a_token_from_another_session_is_refused(clock: Clock, login: StandInLogin) -> None:
    mallory, victim = make_client(clock, login), make_client(clock, login)
    log_in(victim)
    stolen_from_mallory = form_token(mallory.get("/login").text)
    reply = victim.post("/logout", data={"csrf_token": stolen_from_mallory},
                        follow_redirects=False)
    assert reply.status_code == 403
    assert victim.get("/api/me").status_code == 200  # still logged in: nothing changed


def test_a_logout_without_the_token_leaves_the_session_alive(client: TestClient) -> None:
    log_in(client)
    assert client.post("/logout", data={}, follow_redirects=False).status_code == 403
    assert client.post("/logout", data={"csrf_token": "x" * 43},
                       follow_redirects=False).status_code == 403
    assert client.get("/api/me").json()["name"] == "alice"


def test_an_api_post_needs_the_csrf_header_and_errors_are_json(client: TestClient) -> None:
    log_in(client)
    token = client.get("/api/me").json()["csrf_token"]
    refused = client.post("/api/logout")
    assert refused.status_code == 403 and refused.json()["error"] == "csrf"
    # A form field is not the header: a cross-site form cannot set headers.
    assert client.post("/api/logout", data={"csrf_token": token}).status_code == 403
    assert client.post("/api/logout", headers={"x-csrf-token": token}).json() == {"ok": True}
    gone = client.get("/api/me")
    assert gone.status_code == 401 and gone.json()["error"] == "unauthenticated"


def test_a_post_with_no_session_at_all_is_refused(client: TestClient) -> None:
    for path in ("/login", "/logout", "/language"):
        assert client.post(path, data={"csrf_token": "guess"},
                           follow_redirects=False).status_code == 403


# -- headers and cookies -----------------------------------------------------------------------
ROUTES = [("GET", "/"), ("GET", "/login"), ("GET", "/held"), ("GET", "/audit"),
          ("GET", "/overview"), ("GET", "/healthz"), ("GET", "/api/me"), ("GET", "/api/nothing"),
          ("GET", "/no/such/page"), ("POST", "/login"), ("POST", "/logout"),
          ("POST", "/api/logout"), ("DELETE", "/held"), ("GET", "/static/console.css"),
          ("GET", "/static/../app.py")]


@pytest.mark.parametrize("logged_in", [False, True], ids=["anonymous", "logged-in"])
def test_every_route_carries_the_security_headers(client: TestClient, logged_in: bool) -> None:
    if logged_in:
        log_in(client)
    for method, path in ROUTES:
        reply = client.request(method, path, follow_redirects=False)
        where = f"{method} {path} ({reply.status_code})"
        assert reply.headers["content-security-policy"] == CSP, where
        assert "'unsafe-inline'" not in CSP and "script-src 'self'" in CSP
        assert reply.headers["x-content-type-options"] == "nosniff", where
        assert reply.headers["referrer-policy"] == "no-referrer", where
        assert reply.headers["x-frame-options"] == "DENY", where
        expected = ("public, max-age=3600" if path == "/static/console.css" else "no-store")
        assert reply.headers["cache-control"] == expected, where
        assert "server" not in reply.headers or "uvicorn" not in reply.headers["server"]


def test_the_session_cookie_is_httponly_strict_and_secure_only_with_tls(
        clock: Clock, login: StandInLogin, tmp_path: Path) -> None:
    plain = make_client(clock, login).get("/login").headers["set-cookie"]
    assert "HttpOnly" in plain and "SameSite=strict" in plain and "Path=/" in plain
    assert "Secure" not in plain
    assert "Max-Age" not in plain and "expires" not in plain.lower()  # ends with the browser
    tls = ConsoleSettings(tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    secure = make_client(clock, login, tls, https=True).get("/login")
    assert "Secure" in secure.headers["set-cookie"]
    assert secure.headers["strict-transport-security"].startswith("max-age=")


def test_the_login_gives_a_new_session_id(client: TestClient) -> None:
    """Session fixation: a cookie planted before the login is not the logged-in one."""
    client.get("/login")
    planted = client.cookies[COOKIE]
    log_in(client)
    assert client.cookies[COOKIE] != planted
    other = TestClient(client.app, base_url="http://127.0.0.1", cookies={COOKIE: planted})
    assert other.get("/api/me").status_code == 401


# -- sessions ----------------------------------------------------------------------------------
def test_an_idle_session_ends(client: TestClient, clock: Clock,
                              caplog: pytest.LogCaptureFixture) -> None:
    log_in(client)
    clock.now += 29 * 60
    assert client.get("/api/me").status_code == 200  # a request moves the idle deadline
    clock.now += 29 * 60
    assert client.get("/held", follow_redirects=False).status_code == 200
    clock.now += 30 * 60 + 1
    with caplog.at_level(logging.INFO, logger="mailmoat"):
        page = client.get("/held")
    assert page.url.path == "/login" and "Your session ended" in page.text
    assert "event=console_session_expired" in caplog.text
    assert client.get("/api/me").status_code == 401


def test_a_busy_session_still_ends_at_session_max(client: TestClient, clock: Clock) -> None:
    log_in(client)
    started = clock.now
    while clock.now - started < 12 * 3600 - 20 * 60:
        clock.now += 20 * 60
        assert client.get("/api/me").status_code == 200
    clock.now += 20 * 60 + 1  # past 12 hours since the login, 20 minutes since the last use
    assert client.get("/api/me").status_code == 401


def test_after_logout_the_old_cookie_is_worthless(client: TestClient) -> None:
    token = log_in(client)
    copied = client.cookies[COOKIE]
    reply = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/login"
    assert f'{COOKIE}=""' in reply.headers["set-cookie"] or "Max-Age=0" in \
        reply.headers["set-cookie"]
    replay = TestClient(client.app, base_url="http://127.0.0.1", cookies={COOKIE: copied})
    assert replay.get("/api/me").status_code == 401
    assert replay.get("/held", follow_redirects=False).headers["location"] == "/login"


@pytest.mark.parametrize("forge", ["unsigned", "tampered", "other-key", "junk", "huge"])
def test_a_forged_cookie_is_no_session(clock: Clock, login: StandInLogin, forge: str) -> None:
    real = make_client(clock, login)
    log_in(real)
    value = real.cookies[COOKIE]
    session_id, _, signature = value.rpartition(".")
    if forge == "unsigned":
        value = session_id
    elif forge == "tampered":
        value = f"{session_id[:-1]}{'A' if session_id[-1] != 'A' else 'B'}.{signature}"
    elif forge == "other-key":
        other = sessions.SessionStore(b"another key of 32 bytes or more!!", 60, 60)
        value = other._signer.sign(session_id.encode()).decode()
    elif forge == "junk":
        value = "%E3%81%82\x7f;..;%00"
    else:
        value = "A" * 3000 + "." + signature
    forged = TestClient(real.app, base_url="http://127.0.0.1")
    forged.cookies.set(COOKIE, value)
    assert forged.get("/api/me").status_code == 401
    assert forged.get("/held", follow_redirects=False).status_code == 303


def test_a_flood_of_login_pages_keeps_a_bounded_number_of_sessions(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 50)
    log_in(client)  # the oldest: pushed out by the flood, as any session would be
    for _ in range(200):
        TestClient(client.app, base_url="http://127.0.0.1").get("/login")
    store = client.app.app.state.console.sessions
    assert len(store._sessions) == 50


# -- login outcomes ----------------------------------------------------------------------------
def test_a_wrong_password_and_an_unknown_name_read_the_same(client: TestClient) -> None:
    replies = []
    for who in ({"name": "alice", "password": "wrong"},
                {"name": "nobody", "password": "wrong"}):
        token = form_token(client.get("/login").text)
        reply = client.post("/login", data={"csrf_token": token, **who})
        replies.append((reply.status_code, re.sub(r'value="[^"]+"', "", reply.text)))
    assert replies[0] == replies[1] and replies[0][0] == 401
    assert "Wrong user name or password." in replies[0][1]


def test_a_throttled_login_says_when_to_try_again(client: TestClient) -> None:
    for _ in range(5):
        token = form_token(client.get("/login").text)
        client.post("/login", data={"csrf_token": token, "name": "alice", "password": "no"})
    token = form_token(client.get("/login").text)
    reply = client.post("/login", data={"csrf_token": token, **ALICE})
    assert reply.status_code == 429 and reply.headers["retry-after"] == "60"
    assert "try again in 60 seconds" in reply.text
    assert client.get("/api/me").status_code == 401


def test_a_broken_login_backend_gives_a_page_not_a_traceback(
        clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str, password: str, source: str) -> Actor:
        raise KeyError("memberOf")

    client = make_client(clock, broken)
    token = form_token(client.get("/login").text)
    with caplog.at_level(logging.INFO, logger="mailmoat"):
        reply = client.post("/login", data={"csrf_token": token, **ALICE})
    assert reply.status_code == 503 and "Login is not available" in reply.text
    assert "Traceback" not in reply.text and "memberOf" not in reply.text
    assert "event=console_login_error" in caplog.text and "password" not in caplog.text


def test_a_store_or_directory_that_is_down_reads_as_unavailable_not_as_wrong(
        clock: Clock) -> None:
    def down(name: str, password: str, source: str) -> Actor:
        raise LoginRefused("the directory cannot be reached; try again later", "ldap down")

    client = make_client(clock, down)
    token = form_token(client.get("/login").text)
    reply = client.post("/login", data={"csrf_token": token, **ALICE})
    assert reply.status_code == 503 and "Login is not available" in reply.text
    assert "ldap down" not in reply.text


def test_an_oversized_or_odd_login_form_is_refused_quietly(client: TestClient,
                                                           login: StandInLogin) -> None:
    token = form_token(client.get("/login").text)
    for data in ({"name": "a" * 10_000, "password": "x"},
                 {"name": "alice", "password": "p" * 5000},
                 {"name": "", "password": "x"},
                 {"name": "alice\x00", "password": "x"}):
        reply = client.post("/login", data={"csrf_token": token, **data})
        assert reply.status_code in (401, 403) and "Traceback" not in reply.text
    garbage = client.post("/login", content=b"\xff\xfe" * 5000,
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert garbage.status_code == 403
    assert all(len(name) < 300 for name, _ in login.calls)


def test_a_name_with_markup_is_shown_as_text(clock: Clock) -> None:
    evil = "<script>alert(1)</script>\"'&"

    def authenticate(name: str, password: str, source: str) -> Actor:
        return Actor(evil, "admin", frozenset({"<i>x</i>@example.jp"}), source)

    client = make_client(clock, authenticate)
    log_in(client)
    page = client.get("/held").text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&#39;&amp;" in page


# -- language ----------------------------------------------------------------------------------
@pytest.mark.parametrize("header, expected", [
    ("ja,en;q=0.8", "ja"), ("en-US,en;q=0.9,ja;q=0.8", "en"), ("ja-JP", "ja"),
    ("fr, en;q=0.5, ja;q=0.7", "ja"), ("ja;q=0, en", "en"), ("JA;Q=1", "ja"),
    ("ja;q=nan, en;q=0.1", "en"), ("ja;q=inf", None), ("ja;q=-1, en;q=0.2", "en"),
    ("ja;q=0.5e400", None), (";;;,,,==,q=", None), ("*", None), ("", None),
    ("en;q=" + "9" * 10_000, None), ("x," * 100_000 + "ja", None), ("\x00ja\u3042", None),
])
def test_accept_language_is_read_defensively(header: str, expected: str | None) -> None:
    assert i18n.from_accept_language(header) == expected


def test_a_hostile_accept_language_still_gets_a_page(client: TestClient) -> None:
    for header in ("ja;q=" + "1" * 4000, "," * 8000, "ja;q=\u00bd", "ja;q=0x1", "\u3042\xff"):
        page = client.get("/login", headers={"accept-language": header.encode("utf-8")})
        assert page.status_code == 200 and '<html lang="' in page.text


def test_language_follows_setting_then_browser_then_the_users_switch(
        clock: Clock, login: StandInLogin) -> None:
    auto = make_client(clock, login)
    assert 'lang="ja"' in auto.get("/login", headers={"accept-language": "ja"}).text
    assert 'lang="en"' in auto.get("/login").text
    fixed = make_client(clock, login, ConsoleSettings(language="ja"))
    assert "ログイン" in fixed.get("/login", headers={"accept-language": "en"}).text
    token = log_in(auto)
    assert 'lang="en"' in auto.get("/held").text
    switched = auto.post("/language", data={"csrf_token": token, "language": "ja",
                                            "back": "/audit"}, follow_redirects=False)
    assert switched.headers["location"] == "/audit"
    page = auto.get("/audit", headers={"accept-language": "en"}).text
    assert 'lang="ja"' in page and "監査ログ" in page and "管理者" in page


def test_the_language_switch_never_sends_a_user_elsewhere(client: TestClient) -> None:
    token = log_in(client)
    for back in ("https://evil.example/", "//evil.example", "/\\evil.example", "javascript:x"):
        reply = client.post("/language", data={"csrf_token": token, "language": "ja",
                                               "back": back}, follow_redirects=False)
        assert reply.headers["location"] == "/held"


def test_every_string_has_both_languages() -> None:
    assert all(set(texts) == {"ja", "en"} and all(texts.values())
               for texts in i18n.CATALOG.values())


# -- where it listens, and its key ------------------------------------------------------------
@pytest.mark.parametrize("listen", ["0.0.0.0:8026", "192.0.2.1:8026", "[::]:8026",
                                    "mail.example.jp:8026"])
def test_a_listen_off_loopback_without_tls_is_refused(tmp_path: Path, listen: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store: memory://\nconsole:\n  listen: '{listen}'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    problem = caught.value.problems[0]
    assert problem.startswith(f"{config}:3:") and f"(got {listen})" in problem
    assert "console" in problem


def test_a_listen_off_loopback_with_tls_is_allowed(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("console:\n  listen: '0.0.0.0:8443'\n  tls: {cert: c.pem, key: k.pem}\n")
    settings = load_config(config).console
    assert settings is not None and settings.tls and settings.tls_key == tmp_path / "k.pem"
    for loopback in ("127.0.0.1:1", "[::1]:8026", "localhost:8026", "127.9.9.9:80"):
        config.write_text(f"console: {{listen: '{loopback}'}}\n")
        assert load_config(config).console.listen == loopback  # type: ignore[union-attr]


def test_the_console_runs_only_when_configured_and_refuses_bad_tls(tmp_path: Path) -> None:
    from mta.console.server import check_tls, run_console
    config = tmp_path / "gateway.yaml"
    config.write_text("store: memory://\n")
    with pytest.raises(MailmoatError, match="no console: block"):
        run_console(load_config(config))
    (tmp_path / "k.pem").write_text("not a key")
    (tmp_path / "k.pem").chmod(0o644)
    config.write_text("console: {tls: {cert: c.pem, key: k.pem}}\n")
    with pytest.raises(ConfigError, match=r"console.tls.key .*readable by every user"):
        check_tls(load_config(config))
    (tmp_path / "k.pem").chmod(0o600)
    with pytest.raises(ConfigError, match=r"console.tls: cannot load"):
        check_tls(load_config(config))


def test_the_secret_key_file_is_made_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key = load_secret_key(tmp_path / "var" / "console-secret")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "var" / "console-secret").stat().st_mode)
    assert mode == 0o600 and len(key) >= 32
    assert load_secret_key(tmp_path / "var" / "console-secret") == key  # kept, not remade


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o666])
def test_a_secret_key_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "console-secret"
    path.write_text("k" * 64)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o}.*chmod 600"):
        load_secret_key(path)


def test_a_short_or_odd_secret_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "console-secret"
    path.write_text("short\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="fewer than 32 bytes"):
        load_secret_key(path)
    with pytest.raises(ConfigError, match="cannot read it: Is a directory"):
        load_secret_key(tmp_path)
