"""Issue 17's held-mail proof in a real browser (Debian's chromium): `mailmoat serve` with
the auth milter holds mail that fails DMARC under p=quarantine (against a real Knot DNS),
the console serve starts shows it to real accounts (`mailmoat user add --role`), an admin
finds a Japanese subject with the search box, opens and releases it and the test sink gets
it; a user sees only their own mail; an auditor has no button and a crafted POST is
refused; a hostile message runs no script; two are released in one bulk action."""
from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from email.header import Header
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from mta.queue.spool import NoSuchMessage, Queue
from tests.harness.bounded import wait_until
from tests.harness.browser import chromium, console_up, wait_for
from tests.harness.dns_server import KnotServer
from tests.harness.milter_proc import ROOT
from tests.harness.ports import free_port
from tests.harness.sink import SmtpSink
from tests.integration.auth_world import AUTHSERV_ID, STRANGER_IP, make_keys, zones
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration
WAIT = 30.0
POLICY = "internal_networks: [127.0.0.0/8]\n"
PASSWORDS = {"alice": "Alice-Admin-2026", "audrey": "Audrey-Audit-2026",
             "taro": "Taro-User-2026"}
SUBJECT = "見積書の件（保留テスト）"


class Listener:
    """A tiny HTTP server the hostile message's script would call if it ever ran."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hostile_message(port: int) -> bytes:
    pwned = f"http://127.0.0.1:{port}/pwned"
    script = f"<script>fetch('{pwned}?subject');document.title='pwned'</script>"
    return (f"From: boss@quar.test\r\nTo: taro@example.jp\r\n"
            f"Subject: hostile {script}<img src=x onerror=\"fetch('{pwned}?img')\">\r\n"
            "Message-ID: <hostile@quar.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
            "--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            f"<p>Invoice <a href=\"javascript:fetch('{pwned}?link')\">open</a>{script}"
            f"<img src=\"{pwned}?src\" onerror=\"document.body.dataset.ran='yes'\"></p>\r\n"
            "--b\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Disposition: attachment; filename=\"<img src=x onerror=fetch('{pwned}"
            "?file')>.exe\"\r\n\r\nTVo=\r\n--b--\r\n").encode()


def plain_message(subject: str, to: str) -> bytes:
    encoded = Header(subject, "utf-8").encode()
    return (f"From: boss@quar.test\r\nTo: {to}\r\nSubject: {encoded}\r\n"
            f"Message-ID: <{abs(hash(subject))}@quar.test>\r\n\r\nplease see\r\n").encode()


@dataclass
class Gateway:
    serve: Serve
    sink: SmtpSink
    listener: Listener
    base: str
    queue: Queue
    ids: dict[str, str] = field(default_factory=dict)  # name -> queue ID

    def send(self, raw: bytes, recipients: list[str]) -> str:
        with smtplib.SMTP("127.0.0.1", self.serve.port, timeout=WAIT) as client:
            client.ehlo("mail.quar.test")
            assert client.docmd("XCLIENT", f"ADDR={STRANGER_IP}")[0] == 220
            client.ehlo("mail.quar.test")
            client.mail("boss@quar.test")
            for rcpt in recipients:
                client.rcpt(rcpt)
            code, reply = client.data(raw)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]

    def wait_held(self, queue_id: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                reason = self.queue.envelope(queue_id).hold_reason
            except NoSuchMessage:
                reason = None
            if reason:
                return reason
            assert time.monotonic() < deadline, f"{queue_id} not held:\n{self.serve.text()}"
            time.sleep(0.05)


def add_account(config: Path, name: str, role: str, *addresses: str) -> None:
    extra = [arg for address in addresses for arg in ("--address", address)]
    done = subprocess.run([sys.executable, "-m", "mta.cli", "user", "add", name, "--role", role,
                           *extra, "--config", str(config)], input=PASSWORDS[name] + "\n",
                          cwd=ROOT, capture_output=True, text=True, timeout=WAIT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("held-console")
    keys = make_keys(work / "keys")
    port = free_port()
    listener = Listener()
    with KnotServer(zones(keys), work) as dns, SmtpSink() as sink:
        serve = Serve(work, policy=POLICY, relay=f"smtp:[127.0.0.1]:{sink.port}",
                      milters="milters: [{name: auth}]\n"
                              f"dns: {{nameservers: [\"{dns.nameserver}\"], timeout: 2s}}\n"
                              f"console: {{listen: '127.0.0.1:{port}'}}\n")
        serve.config.write_text(serve.config.read_text().replace(
            "hostname: mx.mailmoat.test", f"hostname: {AUTHSERV_ID}"))
        add_account(serve.config, "alice", "admin")
        add_account(serve.config, "audrey", "auditor")
        add_account(serve.config, "taro", "user", "taro@example.jp")
        serve.start()
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: console_up(base), WAIT, serve.text)
            world = Gateway(serve, sink, listener, base, Queue(work / "var" / "spool"))
            for name, raw, rcpts in (
                    ("japanese", plain_message(SUBJECT, "taro@example.jp"), ["taro@example.jp"]),
                    ("hanako", plain_message("for hanako only", "hanako@example.jp"),
                     ["hanako@example.jp"]),
                    ("hostile", hostile_message(listener.port), ["taro@example.jp"]),
                    ("bulk1", plain_message("bulk one", "jiro@example.jp"), ["jiro@example.jp"]),
                    ("bulk2", plain_message("bulk two", "jiro@example.jp"), ["jiro@example.jp"])):
                world.ids[name] = world.send(raw, rcpts)
            for queue_id in world.ids.values():
                assert world.wait_held(queue_id).startswith("DMARC")
            yield world
        finally:
            serve.stop()
            listener.close()
    assert "Traceback" not in serve.text()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def log_in(browser: WebDriver, base: str, name: str) -> None:
    browser.get(base + "/login")
    wait_for(browser, lambda d: d.find_elements(By.ID, "login"))
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "password").send_keys(PASSWORDS[name])
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "nav"))


def listed(browser: WebDriver) -> list[str]:
    return [row.get_attribute("data-queue-id")
            for row in browser.find_elements(By.CSS_SELECTOR, "#held tbody tr")]


def test_an_admin_finds_a_japanese_subject_opens_it_and_releases_it(
        gateway: Gateway, browser: WebDriver) -> None:
    queue_id = gateway.ids["japanese"]
    log_in(browser, gateway.base, "alice")
    box = browser.find_element(By.ID, "q")
    box.send_keys("見積書")
    browser.find_element(By.ID, "search-button").click()
    wait_for(browser, lambda d: "q=" in d.current_url)
    assert listed(browser) == [queue_id]
    link = browser.find_element(By.CSS_SELECTOR, "#held a.subject")
    assert link.text == SUBJECT
    link.click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "release"))
    assert browser.find_element(By.ID, "heading").text == SUBJECT
    assert "dmarc=fail" in browser.find_element(By.ID, "auth-results").text
    assert browser.find_element(By.ID, "why").text.startswith("DMARC")
    browser.find_element(By.ID, "release").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "done"))
    assert browser.current_url == gateway.base + "/held?done=released"
    assert queue_id not in listed(browser)
    deadline = time.monotonic() + WAIT
    while not [m for m in gateway.sink.messages if m.message()["Subject"] == SUBJECT]:
        assert time.monotonic() < deadline, gateway.serve.text()
        time.sleep(0.1)
    [arrived] = [m for m in gateway.sink.messages if m.message()["Subject"] == SUBJECT]
    assert arrived.rcpt_tos == ("taro@example.jp",)
    gateway.serve.wait_log(rf"event=queue_action action=released queue_id={queue_id} "
                           r"actor=console:alice")


def test_a_user_sees_only_their_own_mail_and_guessed_ids_are_404(
        gateway: Gateway, browser: WebDriver) -> None:
    log_in(browser, gateway.base, "taro")
    shown = listed(browser)
    assert gateway.ids["hostile"] in shown and gateway.ids["hanako"] not in shown
    assert "for hanako only" not in browser.page_source
    assert not browser.find_elements(By.ID, "select-all")
    for path in (f"/held/{gateway.ids['hanako']}", "/held/0000000000000000000000"):
        browser.get(gateway.base + path)
        assert browser.find_element(By.ID, "message").text == "Not found."
    browser.get(gateway.base + f"/api/held/{gateway.ids['hanako']}")
    assert '"error":"not_found"' in browser.find_element(By.TAG_NAME, "body").text
    browser.get(gateway.base + f"/held/{gateway.ids['hostile']}")
    assert not browser.find_elements(By.ID, "release")  # their own, but a security hold


def test_an_auditor_has_no_release_button_and_a_crafted_post_is_refused(
        gateway: Gateway, browser: WebDriver) -> None:
    queue_id = gateway.ids["hanako"]
    log_in(browser, gateway.base, "audrey")
    browser.get(gateway.base + f"/held/{queue_id}")
    wait_for(browser, lambda d: d.find_elements(By.ID, "envelope"))
    assert "please see" in browser.page_source
    assert not browser.find_elements(By.ID, "release")
    assert not browser.find_elements(By.ID, "delete")
    # The auditor's own session and its valid CSRF token, sent where the button would post.
    token = browser.find_element(By.CSS_SELECTOR, "input[name=csrf_token]").get_attribute("value")
    cookie = browser.get_cookie("mailmoat_session")
    assert cookie is not None and token
    with httpx.Client(base_url=gateway.base, cookies={cookie["name"]: cookie["value"]},
                      timeout=10) as client:
        page = client.post(f"/held/{queue_id}/release", data={"csrf_token": token,
                                                              "mode": "all"})
        api = client.post(f"/api/held/{queue_id}/release", headers={"x-csrf-token": token})
    assert page.status_code == 403 and api.status_code == 403
    assert gateway.queue.envelope(queue_id).hold_reason is not None
    gateway.serve.wait_log(r"event=console_action_refused name=audrey")


def test_a_hostile_message_is_listed_and_opened_and_no_script_runs(
        gateway: Gateway, browser: WebDriver) -> None:
    queue_id = gateway.ids["hostile"]
    log_in(browser, gateway.base, "alice")
    browser.get_log("browser")  # what the login pages logged
    browser.get(gateway.base + "/held?q=hostile")
    assert listed(browser) == [queue_id]
    title = browser.title
    subject = browser.find_element(By.CSS_SELECTOR, "#held a.subject").text
    assert subject.startswith("hostile <script>fetch(")  # shown as text
    browser.get(gateway.base + f"/held/{queue_id}")
    wait_for(browser, lambda d: d.execute_script(
        "return document.documentElement.dataset.script") == "loaded")
    assert "<img src=x onerror=fetch(" in browser.find_element(By.ID, "attachments").text
    body = browser.find_element(By.CSS_SELECTOR, "pre.body").text
    assert "Invoice" in body
    for element in ("script", "img", "a[href^=javascript]"):
        inside = browser.find_elements(By.CSS_SELECTOR, f"main {element}")
        assert [e for e in inside if e.get_attribute("src") != "/static/held.js"
                and not (e.get_attribute("src") or "").endswith("/static/held.js")] == []
    time.sleep(0.5)  # a script that ran would have called out by now (bounded, not timed)
    assert gateway.listener.hits == []
    # The scripts would set the title to "pwned" and mark the body.
    assert browser.title.endswith(" - mailmoat console") and title != "pwned"
    assert browser.execute_script("return document.body.dataset.ran") is None
    reports = [e["message"] for e in browser.get_log("browser")
               if "Content Security Policy" in e["message"] or "pwned" in e["message"]]
    assert reports == []  # nothing was even tried: the markup never became markup


def test_select_all_then_bulk_release_two(gateway: Gateway, browser: WebDriver) -> None:
    one, two = gateway.ids["bulk1"], gateway.ids["bulk2"]
    log_in(browser, gateway.base, "alice")
    browser.get(gateway.base + "/held?q=bulk")
    assert sorted(listed(browser)) == sorted([one, two])
    boxes = browser.find_elements(By.CSS_SELECTOR, "#held input[name=ids]")
    browser.find_element(By.ID, "select-all").click()  # the static script ticks them all
    assert all(box.is_selected() for box in boxes)
    browser.find_element(By.ID, "bulk-release").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "done"))
    assert browser.find_element(By.ID, "done").text == "2 done, 0 failed."
    deadline = time.monotonic() + WAIT
    while {m.message()["Subject"] for m in gateway.sink.messages} < {"bulk one", "bulk two"}:
        assert time.monotonic() < deadline, gateway.serve.text()
        time.sleep(0.1)
    # An API bulk with a bad ID among good ones: a result for each.
    token = browser.find_element(By.CSS_SELECTOR, "input[name=csrf_token]").get_attribute("value")
    cookie = browser.get_cookie("mailmoat_session")
    assert cookie is not None
    with httpx.Client(base_url=gateway.base, cookies={cookie["name"]: cookie["value"]},
                      timeout=10) as client:
        reply = client.post("/api/bulk", headers={"x-csrf-token": token},
                            json={"action": "release", "ids": [one, "NOSUCHID"]})
    assert reply.status_code == 200
    assert [(r["queue_id"], r["ok"]) for r in reply.json()["results"]] == \
        [(one, False), ("NOSUCHID", False)]
