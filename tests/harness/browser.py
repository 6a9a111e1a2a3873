"""A real browser for the console's tests: Debian's chromium, headless, driven through
chromedriver by Selenium. Every wait is bounded and the browser is always quit.

    with serving(app) as base_url, chromium() as browser:
        browser.get(base_url + "/login")

Selenium is given both paths, so its manager never looks for (or downloads) a browser.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import httpx
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900")
WAIT = 15.0  # s: the longest any page load, script or condition may take


@contextmanager
def chromium() -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="mailmoat-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # The browser's console (CSP violations are reported there), read with get_log.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_up(base: str) -> bool:
    """Whether the console at `base` answers its health check (not yet listening: False)."""
    try:
        return httpx.get(base + "/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any],
             timeout: float = WAIT) -> Any:
    """`condition` true within `timeout`. While a click loads the next page, an element
    found on the old one goes stale, or is not there yet: that is "not yet", not a failure."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,
                                             NoSuchElementException)).until(condition)


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """The app under uvicorn on a loopback port, in a thread; yields its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()
