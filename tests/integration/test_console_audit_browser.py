"""Issue 17's "Decisions and audit" and "Overview" in a real browser (Debian's chromium),
over a real gateway (tests/harness/console_demo.py: `mailmoat serve` with the ratelimit
and attachments milters, the console serve starts, real accounts): an admin searches the
audit log by address, opens a message's story (received, each milter's word, the ZIP,
the delivery) and verifies the chain; an auditor reads the overview, whose numbers are the
gateway's; a user sees only records of their own mail and no overview."""
from __future__ import annotations

import re
from typing import Iterator

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.harness.browser import chromium, wait_for
from tests.harness.console_demo import ACCOUNTS, BAD_CLIENT, OTHER_BAD, DemoGateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoGateway]:
    with DemoGateway(tmp_path_factory.mktemp("audit-console")) as gateway:
        yield gateway
    assert gateway.serve is not None and "Traceback" not in gateway.serve.text()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def log_in(browser: WebDriver, base: str, name: str) -> None:
    browser.get(base + "/login")
    wait_for(browser, lambda d: d.find_elements(By.ID, "login"))
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "password").send_keys(ACCOUNTS[name][1])
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "nav"))


def csp_reports(browser: WebDriver) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser")
            if "Content Security Policy" in entry["message"]]


def text_of(browser: WebDriver, css: str) -> list[str]:
    return [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, css)]


def test_an_admin_searches_opens_a_story_and_verifies_the_chain(demo: DemoGateway,
                                                                 browser: WebDriver) -> None:
    log_in(browser, demo.base, "alice")
    browser.find_element(By.LINK_TEXT, "Audit").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "audit-search"))
    browser.find_element(By.ID, "f-address").send_keys("buyer@customer.example")
    browser.find_element(By.ID, "audit-search-button").click()
    wait_for(browser, lambda d: "address=buyer" in d.current_url
             and d.find_elements(By.ID, "records"))
    assert "encrypted" in text_of(browser, "#records .event")
    ppap = demo.ids["ppap"]
    browser.find_element(By.CSS_SELECTOR, f'a.story-link[href="/audit/{ppap}"]').click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "story"))
    events = [e.get_attribute("data-event")
              for e in browser.find_elements(By.CSS_SELECTOR, "#story li.record")]
    # Received from whom, each milter's word, the ZIP and its notice, the delivery.
    assert {"milter_passed", "encrypted", "queued", "delivered"} <= set(events), events
    page = browser.find_element(By.ID, "story").text
    assert re.search(r"zip\s+AttachFile\.\d{8}\.zip", page), page
    assert "notice_to\nhanako@example.jp" in page and "127.0.0.1" in page
    assert "password" not in browser.page_source.lower().replace('type="password"', "")
    hashes = text_of(browser, "#story .chain code")
    assert hashes and all(re.fullmatch(r"[0-9a-f]{12}", h) for h in hashes)
    browser.find_element(By.ID, "verify-link").click()
    result = wait_for(browser, lambda d: d.find_elements(By.ID, "verify-result"))[0]
    assert result.get_attribute("data-ok") == "yes", result.text
    assert re.fullmatch(r"Chain intact: \d+ records checked\.", result.text)
    assert csp_reports(browser) == []


def test_an_auditor_reads_the_overview_of_what_the_gateway_did(demo: DemoGateway,
                                                               browser: WebDriver) -> None:
    log_in(browser, demo.base, "audrey")
    browser.find_element(By.LINK_TEXT, "Overview").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "chart-day"))
    # The SVG is drawn: laid out at a real size, one line per series.
    width = browser.execute_script(
        "return document.getElementById('chart-hour').getBoundingClientRect().width")
    assert width > 500
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-hour polyline")) == 7
    totals = {e.get_attribute("data-series"): int(e.get_attribute("textContent"))
              for e in browser.find_elements(By.CSS_SELECTOR, "#counts-hour tfoot td")}
    assert totals["held"] == 2  # the two an admin held
    assert totals["encrypted"] == 1 and totals["rejected"] == len(demo.refused) == 2
    assert totals["delivered"] >= 6 and totals["received"] >= totals["delivered"]
    # The same numbers through the API, with the browser's session.
    cookie = browser.get_cookie("mailmoat_session")
    assert cookie is not None
    api = httpx.get(demo.base + "/api/overview?step=day",
                    cookies={"mailmoat_session": cookie["value"]}, timeout=10).json()
    assert api["totals"] == totals
    sources = browser.find_element(By.ID, "top-sources").text
    assert BAD_CLIENT in sources and OTHER_BAD in sources
    assert sources.index(BAD_CLIENT) < sources.index(OTHER_BAD)  # 60 points before 20
    assert csp_reports(browser) == []


def test_a_user_sees_only_records_of_their_own_mail_and_no_overview(
        demo: DemoGateway, browser: WebDriver) -> None:
    log_in(browser, demo.base, "taro")
    assert browser.find_elements(By.LINK_TEXT, "Overview") == []
    browser.find_element(By.LINK_TEXT, "Audit").click()
    records = wait_for(browser, lambda d: d.find_elements(By.ID, "records"))[0].text
    assert "taro@example.jp" in records
    for not_theirs in ("buyer@customer.example", "eigyo@", "sales@", demo.ids["held_ja"]):
        assert not_theirs not in records
    browser.get(f"{demo.base}/audit/{demo.ids['held_ja']}")  # someone else's queue ID
    assert wait_for(browser, lambda d: d.find_elements(By.ID, "message"))[0].text == \
        "Not found."
    browser.get(demo.base + "/overview")
    message = wait_for(browser, lambda d: d.find_elements(By.ID, "message"))[0]
    assert message.text == "The overview is for administrators and auditors."
    assert demo.serve is not None  # the refusal reached the log, with who and from where
    demo.serve.wait_log(r"event=console_action_refused name=taro source=127\.0\.0\.1 "
                        r"path=/overview")
    browser.get(f"{demo.base}/audit/{demo.ids['plain-en']}")  # their own message's story
    wait_for(browser, lambda d: d.find_elements(By.ID, "story"))
    assert csp_reports(browser) == []

