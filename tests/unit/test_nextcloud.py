"""The Nextcloud offload client against the fake Nextcloud (tests/harness/nextcloud_fake.py):
uploads, the password-protected link share and the checks on its reply, every kind of
refusal and failure, retries, TLS, and where the app password comes from."""
from __future__ import annotations

import html
import shutil
import subprocess
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import requests

from milters.attachments.nextcloud import (NextcloudClient, NextcloudError, NextcloudSettings,
                                           Share, check_folder_template, expiry_for,
                                           load_app_password, message_folder)
from milters.core.errors import ConfigError
from tests.harness.nextcloud_fake import NextcloudFake
from tests.harness.ports import free_port

APP_PASSWORD = "Ap9-Secret-AppPw-7731"
SHARE_PASSWORD = "Kx7mR4pWz9aT"
TODAY = date.today()
EXPIRE = TODAY + timedelta(days=7)
FOLDER = "mailmoat/taro@example.jp/20260401-4F2A1C"
FILES = [("見積書 2026年4月.pdf", b"%PDF-1.7 quote\x00\xff" * 50),
         ("議事録 #1 (100%).txt", "会議の議事録です。\n".encode())]

MakeClient = Callable[..., NextcloudClient]


@pytest.fixture
def cloud() -> Iterator[NextcloudFake]:
    # A sub-path, as in https://example.jp/nextcloud: every URL must keep it.
    with NextcloudFake(user="mailmoat", app_password=APP_PASSWORD, prefix="/nextcloud") as fake:
        yield fake


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    sessions: list[requests.Session] = []

    def make(url: str, *, user: str = "mailmoat", password: str = APP_PASSWORD,
             **settings: object) -> NextcloudClient:
        session = requests.Session()
        session.trust_env = False  # no proxy or CA bundle from the environment
        sessions.append(session)
        values: dict[str, object] = {"url": url, "user": user, "timeout": 5.0, **settings}
        return NextcloudClient(NextcloudSettings(**values), password,  # type: ignore[arg-type]
                               session, backoff=0)

    yield make
    for session in sessions:
        session.close()


def upload(client: NextcloudClient, files: list[tuple[str, bytes]] = FILES,
           folder: str = FOLDER, expire: date = EXPIRE) -> list[Share]:
    return client.upload_and_share(files, folder, SHARE_PASSWORD, expire)


def failure(client: NextcloudClient, **kwargs: object) -> NextcloudError:
    with pytest.raises(NextcloudError) as info:
        upload(client, **kwargs)  # type: ignore[arg-type]
    return info.value


def assert_no_secrets(exc: BaseException, *secrets: str) -> None:
    """Neither the exception nor anything chained to it shows a secret."""
    seen: BaseException | None = exc
    while seen is not None:
        for text in (str(seen), repr(seen), *map(str, seen.args)):
            for secret in secrets:
                assert secret not in text
        seen = seen.__cause__ or seen.__context__


# -- the whole round trip ------------------------------------------------------------------------

def test_upload_share_and_download_through_the_link(cloud: NextcloudFake,
                                                     make_client: MakeClient) -> None:
    shares = upload(make_client(cloud.url))

    # One share for the message's folder: every file carries its link.
    assert [s.name for s in shares] == [name for name, _ in FILES]
    assert {s.expires for s in shares} == {EXPIRE}
    assert len({s.url for s in shares}) == 1
    [share] = cloud.shares
    assert shares[0].url == f"{cloud.url}/s/{share.token}"
    assert share.path == tuple(FOLDER.split("/"))
    assert share.expiration == EXPIRE and share.password == SHARE_PASSWORD
    assert share.permissions == 1 | 16  # read, plus "share" that Nextcloud adds itself
    assert cloud.files() == {f"/{FOLDER}/{name}": data for name, data in FILES}

    # The recipient's side: the listing, then each file, with the share password.
    link = shares[0].url
    with requests.Session() as browser:
        browser.trust_env = False
        listing = browser.get(link, auth=("anonymous", SHARE_PASSWORD), timeout=5)
        assert listing.status_code == 200
        for name, data in FILES:
            assert name in html.unescape(listing.text)
            got = browser.get(f"{link}/download", params={"path": "/", "files": name},
                              auth=("anonymous", SHARE_PASSWORD), timeout=5)
            assert got.status_code == 200 and got.content == data
            # Nextcloud 29+'s public WebDAV: user "anonymous", the share password.
            dav = browser.get(f"{cloud.url}/public.php/dav/files/{share.token}/{quote(name)}",
                              auth=("anonymous", SHARE_PASSWORD), timeout=5)
            assert dav.content == data


def test_the_share_request_is_explicit(cloud: NextcloudFake, make_client: MakeClient) -> None:
    upload(make_client(cloud.url))
    [post] = [r for r in cloud.requests if r.method == "POST"]
    assert post.path == "/nextcloud/ocs/v2.php/apps/files_sharing/api/v1/shares"
    assert post.query == "format=json"
    assert post.headers["OCS-APIRequest"] == "true"
    assert post.form == {"path": f"/{FOLDER}", "shareType": "3", "password": "***",
                         "expireDate": EXPIRE.isoformat(), "permissions": "1"}
    # Every URL keeps the sub-path; the records never hold credentials.
    assert all(r.path.startswith("/nextcloud/") for r in cloud.requests)
    assert not any("Authorization" in r.headers for r in cloud.requests)


def test_the_link_wants_the_share_password(cloud: NextcloudFake,
                                           make_client: MakeClient) -> None:
    link = upload(make_client(cloud.url))[0].url
    with requests.Session() as browser:
        browser.trust_env = False
        assert browser.get(link, timeout=5).status_code == 401
        assert browser.get(link, auth=("anonymous", "wrong-password"), timeout=5).status_code == 403
        name = FILES[0][0]
        denied = browser.get(f"{link}/download", params={"path": "/", "files": name},
                             auth=("anonymous", SHARE_PASSWORD[:-1]), timeout=5)
        assert denied.status_code == 403 and FILES[0][1] not in denied.content
        # The browser's way: the password form, then a session cookie.
        wrong = browser.post(f"{link}/authenticate/showShare", data={"password": "nope"},
                             allow_redirects=False, timeout=5)
        assert wrong.status_code == 403
        right = browser.post(f"{link}/authenticate/showShare", data={"password": SHARE_PASSWORD},
                             timeout=5)
        assert right.status_code == 200 and name in html.unescape(right.text)


def test_an_existing_folder_is_reused_only_for_the_same_files(cloud: NextcloudFake,
                                                              make_client: MakeClient) -> None:
    client = make_client(cloud.url)
    upload(client)
    cloud.clear_requests()
    upload(client)  # the MTA retrying the same message: files are replaced, 204
    assert [r.method for r in cloud.requests] == ["MKCOL", "PROPFIND", "PUT", "PUT", "POST"]

    cloud.add_file(f"/{FOLDER}-2/someone-else.pdf", b"private")
    exc = failure(client, folder=f"{FOLDER}-2")
    assert "someone-else.pdf" in str(exc) and not exc.transient
    assert all(s.path != tuple(f"{FOLDER}-2".split("/")) for s in cloud.shares)


# -- what the share reply must show --------------------------------------------------------------

def test_a_silently_shortened_expiry_is_refused_and_the_share_deleted(
        make_client: MakeClient) -> None:
    with NextcloudFake(app_password=APP_PASSWORD, max_expire_days=3,
                       expire_cap="shorten") as cloud:
        exc = failure(make_client(cloud.url))
        assert not exc.transient
        assert (TODAY + timedelta(days=3)).isoformat() in str(exc)
        assert EXPIRE.isoformat() in str(exc)
        assert cloud.shares == []  # deleted again
        assert [r.method for r in cloud.requests][-2:] == ["POST", "DELETE"]


def test_an_expiry_beyond_the_enforced_maximum_is_refused(make_client: MakeClient) -> None:
    # What Nextcloud itself does when the admin enforces a maximum.
    with NextcloudFake(app_password=APP_PASSWORD, max_expire_days=3) as cloud:
        exc = failure(make_client(cloud.url))
        assert exc.status == 404 and not exc.transient
        assert "Cannot set expiration date more than 3 days" in str(exc)


def test_an_expiry_today_is_in_the_past_for_nextcloud(cloud: NextcloudFake,
                                                      make_client: MakeClient) -> None:
    exc = failure(make_client(cloud.url), expire=TODAY)
    assert exc.status == 404 and "Expiration date is in the past" in str(exc)


def test_a_share_without_password_is_refused(make_client: MakeClient) -> None:
    with NextcloudFake(app_password=APP_PASSWORD, drop_share_password=True) as cloud:
        exc = failure(make_client(cloud.url))
        assert "no password" in str(exc) and not exc.transient
        assert cloud.shares == []


def test_the_password_policy_refusal_is_reported(make_client: MakeClient) -> None:
    with NextcloudFake(app_password=APP_PASSWORD, min_share_password=20) as cloud:
        exc = failure(make_client(cloud.url))
        assert exc.status == 403 and not exc.transient
        assert "at least 20 characters" in str(exc)


def test_the_reply_check_on_permissions_and_link_scheme() -> None:
    """The checks the fake cannot easily provoke, on a reply made by hand."""
    data = {"id": "7", "share_type": 3, "path": "/f", "expiration": f"{EXPIRE} 00:00:00",
            "password": "hash", "permissions": 17, "url": "https://cloud.example.jp/s/abc"}
    with NextcloudClient(NextcloudSettings(url="https://cloud.example.jp", user="u"),
                         "pw") as client:
        assert client._checked_link(dict(data), "/f", EXPIRE, "sharing /f") == data["url"]
        for change, says in [({"permissions": 1 | 2}, "permissions 3"),  # write: never asked
                             ({"url": "http://cloud.example.jp/s/abc"}, "overwriteprotocol"),
                             ({"share_type": 0}, "not a public link"),
                             ({"expiration": None}, "expiry to none"),
                             ({"path": "/other"}, "'/other'")]:
            with pytest.raises(NextcloudError, match=says):
                client._checked_link({**data, **change}, "/f", EXPIRE, "sharing /f")


# -- refusals ------------------------------------------------------------------------------------

def test_a_wrong_app_password_is_401_and_not_transient(cloud: NextcloudFake,
                                                       make_client: MakeClient) -> None:
    wrong = "Wrong-AppPw-0000"
    exc = failure(make_client(cloud.url, password=wrong))
    assert exc.status == 401 and not exc.transient
    assert "app password" in str(exc)
    assert_no_secrets(exc, wrong, SHARE_PASSWORD)


def test_writes_forbidden_are_403(make_client: MakeClient) -> None:
    with NextcloudFake(app_password=APP_PASSWORD, deny_writes=True) as cloud:
        exc = failure(make_client(cloud.url))
        assert exc.status == 403 and not exc.transient
        assert "denied by access control" in str(exc)


def test_a_login_name_instead_of_the_user_id_is_explained(make_client: MakeClient) -> None:
    # An e-mail login authenticates, but the WebDAV path needs the user id.
    with NextcloudFake(user="4f8e-uid", login="taro@example.jp",
                       app_password=APP_PASSWORD) as cloud:
        client = make_client(cloud.url, user="taro@example.jp")
        exc = failure(client)
        assert exc.status == 409 and not exc.transient
        assert "user id" in str(exc)


def test_a_missing_path_is_404_naming_the_file(cloud: NextcloudFake,
                                               make_client: MakeClient) -> None:
    cloud.fail_next(1, 404, method="PUT")  # e.g. the folder was deleted meanwhile
    exc = failure(make_client(cloud.url))
    assert exc.status == 404 and not exc.transient
    assert exc.name == FILES[0][0] and FILES[0][0] in str(exc)


def test_a_full_quota_is_507_and_not_transient(make_client: MakeClient) -> None:
    with NextcloudFake(app_password=APP_PASSWORD, quota=100) as cloud:
        exc = failure(make_client(cloud.url))
        assert exc.status == 507 and not exc.transient
        assert exc.name == FILES[0][0] and FILES[0][0] in str(exc)
        assert "Insufficient space" in str(exc)
        # Not retried: a full quota stays full for the next second too.
        assert [r.method for r in cloud.requests].count("PUT") == 1


@pytest.mark.parametrize("name, says", [
    (".htaccess", "is a forbidden file or folder name"),
    ("back\\slash.txt", "is not allowed inside a file or folder name"),
])
def test_a_forbidden_file_name_is_reported_with_the_name(cloud: NextcloudFake,
                                                         make_client: MakeClient,
                                                         name: str, says: str) -> None:
    exc = failure(make_client(cloud.url), files=[("fine.txt", b"1"), (name, b"2")])
    assert exc.status == 400 and not exc.transient
    assert exc.name == name and repr(name) in str(exc) and says in str(exc)
    assert cloud.shares == []


def test_a_reply_that_is_not_ocs_json_is_reported(cloud: NextcloudFake,
                                                  make_client: MakeClient) -> None:
    cloud.reply_next(1, 200, b"<html>Login</html>", content_type="text/html", method="POST")
    exc = failure(make_client(cloud.url))
    assert "not an OCS JSON reply" in str(exc) and "text/html" in str(exc)
    assert not exc.transient


# -- retries and transient failures --------------------------------------------------------------

def test_500_twice_then_success_with_two_retries(cloud: NextcloudFake,
                                                 make_client: MakeClient) -> None:
    cloud.fail_next(2, 500, method="PUT")
    upload(make_client(cloud.url, retries=2))
    assert [r.method for r in cloud.requests].count("PUT") == len(FILES) + 2
    assert len(cloud.files()) == len(FILES)


@pytest.mark.parametrize("method", ["MKCOL", "PUT", "POST"])
def test_503_three_times_is_transient(cloud: NextcloudFake, make_client: MakeClient,
                                      method: str) -> None:
    cloud.fail_next(3, 503, method=method)
    exc = failure(make_client(cloud.url, retries=2))
    assert exc.status == 503 and exc.transient
    assert [r.method for r in cloud.requests].count(method) == 3


def test_a_dropped_connection_is_retried(cloud: NextcloudFake, make_client: MakeClient) -> None:
    cloud.drop_next(1, method="PUT")
    upload(make_client(cloud.url, retries=1))
    cloud.drop_next(3, method="POST")
    exc = failure(make_client(cloud.url, retries=2), folder=FOLDER + "-again")
    assert exc.transient and exc.status is None


def test_a_refused_connection_is_transient(make_client: MakeClient) -> None:
    exc = failure(make_client(f"http://127.0.0.1:{free_port()}", retries=1))
    assert exc.transient and exc.status is None and "cannot reach" in str(exc)


def test_a_timeout_is_transient_and_not_retried(cloud: NextcloudFake,
                                                make_client: MakeClient) -> None:
    cloud.delay_next(1, 2.0, method="MKCOL")
    started = time.monotonic()
    exc = failure(make_client(cloud.url, timeout=0.3, retries=2))
    assert time.monotonic() - started < 1.5
    assert exc.transient and exc.status is None and "timed out" in str(exc)
    assert [r.method for r in cloud.requests] == ["MKCOL"]


# -- secrets -------------------------------------------------------------------------------------

def test_no_password_in_any_error(make_client: MakeClient) -> None:
    scenarios: list[tuple[dict[str, object], Callable[[NextcloudFake], None]]] = [
        ({"quota": 10}, lambda c: None),
        ({"min_share_password": 40}, lambda c: None),
        ({"max_expire_days": 1, "expire_cap": "shorten"}, lambda c: None),
        ({}, lambda c: c.fail_next(3, 503)),
        ({}, lambda c: c.drop_next(3)),
        # A server (or a proxy) that echoes secrets back in its message.
        ({}, lambda c: c.reply_next(
            1, 403, (f'{{"ocs": {{"meta": {{"statuscode": 403, "message": "bad password '
                     f'{SHARE_PASSWORD} for {APP_PASSWORD}"}}, "data": []}}}}').encode(),
            content_type="application/json", method="POST")),
    ]
    for options, arm in scenarios:
        with NextcloudFake(app_password=APP_PASSWORD, **options) as cloud:  # type: ignore[arg-type]
            arm(cloud)
            client = make_client(cloud.url)
            exc = failure(client)
            assert_no_secrets(exc, APP_PASSWORD, SHARE_PASSWORD)
            assert APP_PASSWORD not in repr(client)
    # The echo case shows where the secret was, masked.
    assert "bad password *** for ***" in str(exc)


# -- names and paths -----------------------------------------------------------------------------

def test_path_segments_are_percent_encoded(cloud: NextcloudFake,
                                           make_client: MakeClient) -> None:
    nfd = unicodedata.normalize("NFD", "がぎぐ.txt")  # macOS mail sends decomposed names
    names = ["a b.txt", "no#fragment.txt", "100%.txt", "what?.txt", "a&b+c=d.txt",
             "請求書 第1版.xlsx", "~tilde;semi,comma'quote.txt", nfd]
    folder = "mailmoat/送信者 one/2026 04#01"
    files = [(name, name.encode()) for name in names]
    shares = upload(make_client(cloud.url), files=files, folder=folder)

    stored = {unicodedata.normalize("NFC", n) for n in names}
    assert {s.name for s in shares} == stored
    assert set(cloud.files()) == {f"/{folder}/{name}" for name in stored}
    puts = [r.path for r in cloud.requests if r.method == "PUT"]
    assert any(p.endswith("/no%23fragment.txt") for p in puts)
    assert any(p.endswith("/100%25.txt") for p in puts)
    assert any(p.endswith("/what%3F.txt") for p in puts)
    assert any("/%E9%80%81%E4%BF%A1%E8%80%85%20one/2026%2004%2301/" in p for p in puts)

    # PROPFIND sees the same names (Depth 1: the folder and its children; Depth 0: itself).
    dav = (f"{cloud.url}/remote.php/dav/files/mailmoat/mailmoat/"
           f"{quote('送信者 one')}/{quote('2026 04#01')}")
    listing = propfind(dav, "1")
    assert len(listing) == len(names) + 1
    assert {href.rsplit("/", 1)[-1] for href in listing if not href.endswith("/")} == stored
    [itself] = propfind(dav, "0")
    assert itself.endswith("/mailmoat/送信者 one/2026 04#01/")


def propfind(url: str, depth: str) -> list[str]:
    """Decoded hrefs of a PROPFIND reply."""
    reply = requests.request("PROPFIND", url, auth=("mailmoat", APP_PASSWORD),
                             headers={"Depth": depth}, timeout=5)
    assert reply.status_code == 207
    root = ET.fromstring(reply.content)
    return [unquote(h.text or "") for h in root.iter("{DAV:}href")]


def test_message_folders_are_path_safe() -> None:
    day = date(2026, 4, 1)
    template = NextcloudSettings(url="https://x", user="u").folder
    assert message_folder(template, "Taro.Yamada@Example.JP", "4F2A1C", day) \
        == "mailmoat/taro.yamada@example.jp/20260401-4F2A1C"
    assert message_folder(template, "<>", "", day) == "mailmoat/unknown-sender/20260401-message"
    hostile = message_folder(template, "../../etc@x", "<a/../b c@host>", day)
    segments = hostile.split("/")
    assert len(segments) == 3 and ".." not in segments
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@._+-")
               for s in segments)
    assert check_folder_template("x/{sender}/{nope}") is not None
    assert check_folder_template("../{id}") is not None
    assert check_folder_template(template) is None
    assert expiry_for(NextcloudSettings(url="https://x", user="u", expire_days=7), day) \
        == date(2026, 4, 8)


@pytest.mark.parametrize("files, folder", [
    ([("a.txt", b"1"), ("a.txt", b"2")], FOLDER),  # the second would replace the first
    ([("dir/a.txt", b"1")], FOLDER),
    ([("..", b"1")], FOLDER),
    ([], FOLDER),
    ([("a.txt", b"1")], "mailmoat/../etc"),
    ([("a.txt", b"1")], "/"),
])
def test_bad_arguments_are_refused_before_any_request(cloud: NextcloudFake,
                                                      make_client: MakeClient,
                                                      files: list[tuple[str, bytes]],
                                                      folder: str) -> None:
    with pytest.raises(ValueError):
        make_client(cloud.url).upload_and_share(files, folder, SHARE_PASSWORD, EXPIRE)
    assert cloud.requests == []


# -- the fake's OCS dialects ---------------------------------------------------------------------

def test_the_fake_speaks_ocs_xml_and_v1(cloud: NextcloudFake) -> None:
    cloud.add_file("/shared/a.txt", b"a")
    form = {"path": "/shared/a.txt", "shareType": "3", "password": SHARE_PASSWORD,
            "expireDate": EXPIRE.isoformat()}
    auth = ("mailmoat", APP_PASSWORD)
    headers = {"OCS-APIRequest": "true"}
    v2 = f"{cloud.url}/ocs/v2.php/apps/files_sharing/api/v1/shares"
    xml = requests.post(v2, data=form, auth=auth, headers=headers, timeout=5)
    root = ET.fromstring(xml.content)
    assert xml.status_code == 200 and root.findtext("meta/statuscode") == "200"
    assert root.findtext("data/expiration") == f"{EXPIRE} 00:00:00"
    assert root.findtext("data/permissions") == "17"  # a file: read + share

    v1 = v2.replace("/v2.php/", "/v1.php/")
    bad = requests.post(v1, data={**form, "expireDate": "1.4.2026"}, auth=auth,
                        headers=headers, params={"format": "json"}, timeout=5)
    assert bad.status_code == 200  # v1 keeps HTTP 200 and says it in the statuscode
    assert bad.json()["ocs"]["meta"]["statuscode"] == 404

    no_header = requests.post(v2, data=form, auth=auth, params={"format": "json"}, timeout=5)
    assert no_header.status_code == 401
    assert no_header.json()["ocs"]["meta"]["statuscode"] == 997


# -- TLS -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private CA and a certificate for 127.0.0.1 it signed (openssl, EC keys: quick)."""
    # scripts/setup installs openssl; without it the TLS tests fail here, they do not skip.
    assert shutil.which("openssl"), "openssl is missing: run scripts/setup"
    tmp = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=mailmoat test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", "1", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return {name: str(tmp / f"{name}.pem") for name in ("ca", "server")} | {
        "key": str(tmp / "server.key")}


def test_tls_with_the_private_ca(certificates: dict[str, str],
                                 make_client: MakeClient) -> None:
    with NextcloudFake(app_password=APP_PASSWORD,
                       tls=(certificates["server"], certificates["key"])) as cloud:
        assert cloud.url.startswith("https://")
        shares = upload(make_client(cloud.url, ca_file=certificates["ca"]))
        assert shares[0].url.startswith("https://")


def test_tls_verification_is_always_on(certificates: dict[str, str],
                                       make_client: MakeClient) -> None:
    with NextcloudFake(app_password=APP_PASSWORD,
                       tls=(certificates["server"], certificates["key"])) as cloud:
        exc = failure(make_client(cloud.url))  # no ca_file: the system CAs do not know it
        assert not exc.transient and "TLS" in str(exc)
        assert cloud.files() == {}


def test_an_http_link_behind_https_is_refused(certificates: dict[str, str],
                                              make_client: MakeClient) -> None:
    with NextcloudFake(app_password=APP_PASSWORD, link_base="http://cloud.example.jp",
                       tls=(certificates["server"], certificates["key"])) as cloud:
        exc = failure(make_client(cloud.url, ca_file=certificates["ca"]))
        assert "overwriteprotocol" in str(exc) and cloud.shares == []


# -- the app password ----------------------------------------------------------------------------

def test_app_password_from_the_environment() -> None:
    settings = NextcloudSettings(url="https://x", user="u", password_env="NC_APP_PASSWORD")
    assert load_app_password(settings, {"NC_APP_PASSWORD": f"  {APP_PASSWORD}\n"}) == APP_PASSWORD
    with pytest.raises(ConfigError) as info:
        load_app_password(settings, {})
    assert len(info.value.problems) == 1 and "NC_APP_PASSWORD" in info.value.problems[0]


def test_app_password_from_the_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILMOAT_NC_TEST_PW", APP_PASSWORD)
    settings = NextcloudSettings(url="https://x", user="u", password_env="MAILMOAT_NC_TEST_PW")
    assert load_app_password(settings) == APP_PASSWORD


def test_app_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "nextcloud.pw"
    secret.write_text(APP_PASSWORD + "\n")
    secret.chmod(0o600)
    settings = NextcloudSettings(url="https://x", user="u", password_file=str(secret))
    assert load_app_password(settings) == APP_PASSWORD
    secret.chmod(0o644)  # every local user could read the app password: refused, not read
    with pytest.raises(ConfigError, match="readable by every user") as info:
        load_app_password(settings)
    assert_no_secrets(info.value, APP_PASSWORD)
    secret.chmod(0o600)

    secret.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_app_password(settings)
    secret.write_bytes(b"\xff\xfe" + APP_PASSWORD.encode())
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_app_password(settings)
    assert_no_secrets(info.value, APP_PASSWORD)
    missing = NextcloudSettings(url="https://x", user="u", password_file=str(tmp_path / "no"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_app_password(missing)


def test_app_password_source_is_required_and_single(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_app_password(NextcloudSettings(url="https://x", user="u"), {})
    [problem] = info.value.problems
    assert "password_env or password_file is required" in problem
    both = NextcloudSettings(url="https://x", user="u", password_env="A",
                             password_file=str(tmp_path / "pw"))
    with pytest.raises(ConfigError, match="not both"):
        load_app_password(both, {"A": "x"})
