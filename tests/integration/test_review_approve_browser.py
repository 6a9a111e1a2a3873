"""Issue 18's approval, end to end in a real browser (Debian's chromium): `mailmoat serve`
with milters [review, attachments] and the console it starts, a policy that asks
boss@example.jp to approve outbound mail with a file for an outside domain, the test sink.

Approve: the approver's notice is taken from the sink, its approve link opened, the button
pressed; only then does the message go, ZIPped, without the X-Mailmoat-Review header, and
only then does the password notice go (the sink held none before). Reject with a reason: the
sender is told, with the reason; nothing else goes and the queue is empty."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest
from selenium.webdriver.common.by import By

from milters.core.review import ReviewRecord
from tests.harness.browser import chromium, wait_for
from tests.harness.review_world import (BOSS, OUTSIDE, SENDER, WAIT, book_of, gateway_with_console,
                                       kind_of, kinds, settle)
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_console_review_browser import action_of, text_of
from tests.integration.test_review_milter import queue_list
from tests.harness.review_world import SAMPLE, parsed
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration
POLICY = """\
internal_networks: [127.0.0.0/8]
own_domains: [example.jp]
review: {language: en}
rules:
  - name: files-to-outside-need-approval
    when: {direction: outbound, outside_recipients: true, attachments: true}
    then: {review: {approve: {approvers: [boss@example.jp], timeout: 1h}}}
  - name: outside-recipients-get-a-zip
    when: {direction: outbound, recipient: ["*", "!@example.jp"]}
    then: {attachments: encrypt}
"""
# Markup, a quote and Japanese in the reason: shown as text in the notice, never lost.
REASON = "添付の見積書は古い版です <b>\"v2\"</b> & 再送してください"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Serve, SmtpSink, str]]:
    with gateway_with_console(tmp_path, POLICY) as running:
        yield running


def held_with_link(serve: Serve, sink: SmtpSink, base: str, action: str) -> tuple[str, str]:
    """Send the sample; (review ID, the approver's link for `action`) once both notices
    (the sender's, the approver's) are at the sink and nothing else is."""
    result = run_swaks(serve.port, mail_from=SENDER, rcpt=[OUTSIDE], data_file=SAMPLE)
    assert result.code("DATA_END") == 250, result.transcript
    held = serve.wait_log(r"event=review_held .*review=([0-9a-f]{32}) kind=approve")
    sink.wait_for(2, timeout=WAIT)
    assert kinds(sink) == ["review", "review"], kinds(sink)
    [notice] = [item for item in sink.messages if item.rcpt_tos == (BOSS,)]
    links = re.findall(rf"{re.escape(base)}/review/[A-Za-z0-9_.-]+", text_of(notice.data))
    assert sorted(action_of(link) for link in links) == ["approve", "reject"], links
    [link] = [link for link in links if action_of(link) == action]
    return held.group(1), link


def confirm(browser, action: str) -> str:  # type: ignore[no-untyped-def]
    """Press the page's button, which must be for `action`; the state the page then shows."""
    button = browser.find_element(By.ID, "confirm")
    assert button.get_attribute("data-action") == action
    button.click()
    wait_for(browser, lambda d: d.find_elements(By.ID, "done"))
    return str(browser.find_element(By.ID, "done").get_attribute("data-state"))


def recorded(serve: Serve, review_id: str) -> ReviewRecord | None:
    book = book_of(serve)
    try:
        return book.get(review_id)
    finally:
        book.close()


def test_approved_in_the_browser_the_message_goes_zipped_and_then_its_password(
        gateway: tuple[Serve, SmtpSink, str]) -> None:
    serve, sink, base = gateway
    review_id, approve = held_with_link(serve, sink, base, "approve")
    time.sleep(2.5)  # a couple of runner rounds: a hold must not leak anything meanwhile
    assert kinds(sink) == ["review", "review"]  # no message, no password notice yet
    with chromium() as browser:
        browser.get(approve)
        wait_for(browser, lambda d: d.find_elements(By.ID, "summary"))
        assert browser.find_element(By.ID, "sender").text == SENDER
        assert OUTSIDE in browser.find_element(By.ID, "recipients").text
        assert kinds(sink) == ["review", "review"]  # opening the link released nothing
        assert confirm(browser, "approve") == "approved"
    sink.wait_for(4, timeout=WAIT)
    settle(serve, r"event=review_released ")
    assert kinds(sink) == ["outside", "password", "review", "review"], kinds(sink)
    log = serve.text()
    # The ZIP and its password were made after the approval, once.
    zipped_at = [m.start() for m in re.finditer(r"event=attachments ", log)]
    assert len(zipped_at) == 1 and zipped_at[0] > log.index("event=review_decided"), log
    [outside] = [item for item in sink.messages if kind_of(item) == "outside"]
    message = parsed(outside)
    names = [p.get_filename() for p in message.iter_attachments() if p.get_filename()]
    assert len(names) == 1 and names[0].endswith(".zip"), names
    # The review's ID does not leave the gateway.
    assert message.get_all("X-Mailmoat-Review") is None
    assert review_id.encode() not in outside.data
    [password] = [item for item in sink.messages if kind_of(item) == "password"]
    assert password.rcpt_tos == (SENDER,)
    record = recorded(serve, review_id)
    assert record is not None and record.state == "approved" and record.carried_out
    assert record.decisions[-1].who == BOSS
    assert "(held:" not in queue_list(serve.config)


def test_rejected_with_a_reason_the_sender_is_told_and_nothing_goes(
        gateway: tuple[Serve, SmtpSink, str]) -> None:
    serve, sink, base = gateway
    review_id, reject = held_with_link(serve, sink, base, "reject")
    with chromium() as browser:
        browser.get(reject)
        wait_for(browser, lambda d: d.find_elements(By.ID, "reason"))
        browser.find_element(By.ID, "reason").send_keys(REASON)
        assert confirm(browser, "reject") == "rejected"
    sink.wait_for(3, timeout=WAIT)
    settle(serve, r"event=review_dropped ")
    assert kinds(sink) == ["review", "review", "review"], kinds(sink)
    told = [item for item in sink.messages if item.rcpt_tos == (SENDER,)]
    assert len(told) == 2  # the notice when held, then the rejection
    result = [item for item in told if REASON in text_of(item.data)]
    assert len(result) == 1, [text_of(item.data) for item in told]
    assert "event=attachments " not in serve.text()  # no ZIP made, no password sent
    record = recorded(serve, review_id)
    assert record is not None and record.state == "rejected" and record.carried_out
    assert record.decisions[-1].reason == REASON
    assert queue_list(serve.config).strip() == "the queue is empty"
