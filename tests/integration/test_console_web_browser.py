"""The console in a real browser (Debian's chromium through chromedriver): log in with the
stand-in login, see the frame, a page carrying an inline script (a test-only route behind
the same headers) does not run it and the browser reports the CSP violation, log out."""
from __future__ import annotations

from typing import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from milters.core.config import ConsoleSettings
from mta.console.app import create_app
from tests.harness.browser import chromium, serving, wait_for
from tests.harness.console_login import StandInLogin

pytestmark = pytest.mark.integration

INLINE = """<!doctype html><html><head><script src="/static/console.js"></script></head>
<body><p id="target">untouched</p>
<script>document.getElementById("target").textContent = "inline ran";</script>
<img src="x" id="broken" onerror="document.title='onerror ran'">
<a id="link" href="javascript:document.title='link ran'">x</a></body></html>"""


async def inline_page(request: Request) -> HTMLResponse:
    return HTMLResponse(INLINE)


@pytest.fixture(scope="module")
def console() -> Iterator[str]:
    app = create_app(ConsoleSettings(), key=b"browser-test-key-" * 4,
                     authenticate=StandInLogin(),
                     extra_routes=[Route("/test/inline", inline_page)])
    with serving(app) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def test_log_in_see_the_frame_and_log_out(console: str, browser: WebDriver) -> None:
    browser.get(console + "/held")  # not logged in: sent to the login page
    wait_for(browser, lambda d: d.find_elements(By.ID, "login"))
    assert browser.current_url == console + "/login"
    browser.find_element(By.ID, "name").send_keys("alice")
    browser.find_element(By.ID, "password").send_keys("alice-pass-2026")
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "nav"))
    assert browser.current_url == console + "/held"
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#nav a")]
    assert links == ["Held mail", "Audit", "Overview", "Reviews"]
    assert "alice" in browser.find_element(By.ID, "who").text
    # The static script runs (script-src 'self'); the cookie is out of a script's reach.
    assert wait_for(browser, lambda d: d.execute_script(
        "return document.documentElement.dataset.script")) == "loaded"
    assert browser.execute_script("return document.cookie") == ""
    browser.find_element(By.ID, "language").click()
    wait_for(browser, lambda d: "保留メール" in d.find_element(By.ID, "heading").text)
    browser.find_element(By.ID, "logout").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "login"))
    browser.get(console + "/audit")
    wait_for(browser, lambda d: d.find_elements(By.ID, "login"))
    assert browser.current_url == console + "/login"


def test_an_inline_script_does_not_run_and_the_browser_reports_it(
        console: str, browser: WebDriver) -> None:
    browser.get_log("browser")  # what earlier pages logged
    browser.get(console + "/test/inline")
    # The static script ran, so the page is scripted: only CSP can stop the inline one.
    wait_for(browser, lambda d: d.execute_script(
        "return document.documentElement.dataset.script") == "loaded")
    browser.find_element(By.ID, "link").click()
    reports = wait_for(browser, lambda d: [
        entry["message"] for entry in d.get_log("browser")
        if "Content Security Policy" in entry["message"]] or None)
    assert browser.find_element(By.ID, "target").text == "untouched"
    assert browser.title not in ("onerror ran", "link ran")
    assert any("inline script" in message or "script-src" in message for message in reports)
