"""LDAP logins through the console's page against a real OpenLDAP slapd
(tests/harness/slapd.py), in a real browser: `mailmoat console` alone with `console.ldap`;
an admin by group logs in and reads the overview, an auditor too, and a person in no mapped
group is refused with the same words as a wrong password."""
from __future__ import annotations

import subprocess
from typing import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.harness.browser import chromium, wait_for
from tests.harness.ports import free_port
from tests.harness.slapd import ADMINS, AUDITORS, PASSWORDS, PEOPLE, Slapd
from tests.integration.test_console_web_serve import USER, console_cmd, wait_healthy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("ldap-console")
    port = free_port()
    with Slapd() as slapd:
        config = work / "gateway.yaml"
        # No `user` role mapped: bob, in neither group, may not log in at all.
        config.write_text(
            f"{USER}store: sqlite:///state.db\nconsole:\n  listen: '127.0.0.1:{port}'\n"
            f"  ldap:\n    url: {slapd.url}\n    timeout: 2s\n"
            f"    user_dn: 'uid={{name}},{PEOPLE}'\n"
            f"    roles: {{admin: ['{ADMINS}'], auditor: ['{AUDITORS}']}}\n")
        log = work / "console.log"
        proc = console_cmd(config, log)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, proc, log)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(20)
        assert "Traceback" not in log.read_text()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def submit_login(browser: WebDriver, base: str, name: str, password: str) -> None:
    browser.get(base + "/login")
    wait_for(browser, lambda d: d.find_elements(By.ID, "login"))
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "nav") or
             d.find_elements(By.ID, "message"))


@pytest.mark.parametrize("name, role", [("alice", "administrator"), ("audrey", "auditor")])
def test_an_ldap_admin_or_auditor_logs_in_through_the_page_and_sees_the_overview(
        console: str, browser: WebDriver, name: str, role: str) -> None:
    submit_login(browser, console, name, PASSWORDS[name])
    assert browser.find_element(By.ID, "who").text == f"Logged in as {name} ({role})"
    browser.find_element(By.LINK_TEXT, "Overview").click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "chart-hour"))
    assert browser.find_element(By.ID, "heading").text == "Overview"
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 2


@pytest.mark.parametrize("name, password", [
    ("bob", PASSWORDS["bob"]),  # the right password, but in no mapped group
    ("alice", PASSWORDS["bob"]),  # a wrong password: the same answer
])
def test_someone_in_no_mapped_group_is_refused_at_the_page(
        console: str, browser: WebDriver, name: str, password: str) -> None:
    submit_login(browser, console, name, password)
    assert browser.find_elements(By.ID, "nav") == []
    assert browser.find_element(By.ID, "message").text == "Wrong user name or password."
    browser.get(console + "/overview")  # still no session: back to the login page
    wait_for(browser, lambda d: d.current_url.endswith("/login"))
