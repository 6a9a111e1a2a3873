"""Issue 18's review link in a real browser (Debian's chromium): `mailmoat serve` with the
review milter holds outbound mail with a file for an outside recipient (a delay of 1h),
the sender's notice arrives at the test sink, its cancel link opens the console serve
started, the page shows the message's summary and changes nothing until the button is
pressed; pressing it cancels the review in the real review book."""
from __future__ import annotations

import base64
import email
import json
import re
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from typing import Iterator

import pytest
from selenium.webdriver.common.by import By

from milters.core.audit import open_audit_log
from milters.core.config import load_config
from milters.core.jis import decode_cp50220
from milters.core.review import open_review_book
from tests.harness.browser import chromium, wait_for
from tests.harness.review_world import OUTSIDE, SAMPLE, SENDER, WAIT, gateway_with_console
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration
POLICY = """\
internal_networks: [127.0.0.0/8]
own_domains: [example.jp]
review: {language: en}
rules:
  - name: files-to-outside-wait
    when: {direction: outbound, outside_recipients: true, attachments: true}
    then: {review: {delay: 1h}}
"""


def text_of(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    part = message.get_body(("plain",)) or message
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    charset = (part.get_content_charset() or "utf-8").lower()
    return decode_cp50220(data) if charset == "iso-2022-jp" else data.decode(charset)


def action_of(link: str) -> str:
    """The action a link's token is for (its payload is [review, person, action, expiry])."""
    head = link.rsplit("/", 1)[1].split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))[2])


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Serve, SmtpSink, str]]:
    with gateway_with_console(tmp_path, POLICY, milters=("review",)) as running:
        yield running


def test_the_cancel_link_of_a_notice_shows_the_summary_and_cancels_on_the_button(
        gateway: tuple[Serve, SmtpSink, str]) -> None:
    serve, sink, base = gateway
    result = run_swaks(serve.port, mail_from=SENDER, rcpt=[OUTSIDE], data_file=SAMPLE)
    assert result.code("DATA_END") == 250, result.transcript
    held = serve.wait_log(r"event=review_held .*queue_id=(\S+) .*review=([0-9a-f]{32}) "
                          r"kind=delay")
    queue_id, review_id = held.group(1), held.group(2)
    notice = sink.wait_for(1, timeout=WAIT)[0]
    assert notice.rcpt_tos == (SENDER,)
    links = re.findall(rf"{re.escape(base)}/review/[A-Za-z0-9_.-]+", text_of(notice.data))
    cancel = [link for link in links if action_of(link) == "cancel"]
    assert len(cancel) == 1, links
    book = open_review_book(load_config(serve.config))
    try:
        record = book.get(review_id)
        assert record is not None and record.state == "pending"
        with chromium() as browser:
            browser.get(cancel[0])
            wait_for(browser, lambda d: d.find_elements(By.ID, "summary"))
            # The summary: who, to whom, the (Japanese) subject and the file names.
            assert browser.find_element(By.ID, "sender").text == SENDER
            assert OUTSIDE in browser.find_element(By.ID, "recipients").text
            assert browser.find_element(By.ID, "subject").text == record.subject
            shown = browser.find_element(By.ID, "attachments").text
            assert record.attachments and all(name in shown for name in record.attachments)
            # Opening the link decided nothing (a mail scanner would have done this much).
            assert book.get(review_id).state == "pending"  # type: ignore[union-attr]
            button = browser.find_element(By.ID, "confirm")
            assert button.get_attribute("data-action") == "cancel"
            button.click()
            wait_for(browser, lambda d: d.find_elements(By.ID, "done"))
            assert browser.find_element(By.ID, "done").get_attribute("data-state") \
                == "cancelled"
            # The link once more: refused, clearly.
            browser.get(cancel[0])
            message = wait_for(browser, lambda d: d.find_elements(By.ID, "message"))[0]
            assert message.get_attribute("data-reason") == "token_used"
        after = book.get(review_id)
        assert after is not None and after.state == "cancelled"
        assert after.decisions[-1].who == SENDER and after.decisions[-1].action == "cancel"
    finally:
        book.close()
    serve.wait_log(rf"event=review_decided .*actor=review:{re.escape(SENDER)} ")
    # The decision is in the message's story in the audit log, with who and from where.
    audit = open_audit_log(load_config(serve.config))
    try:
        decided = [r for r in audit.story(queue_id) if r.event == "review_decided"]
    finally:
        audit.close()
    assert [(r.actor, r.source, r.fields["action"]) for r in decided] == \
        [(f"review:{SENDER}", "127.0.0.1", "cancel")]
    # Held, never sent: the outside recipient got nothing.
    assert not [item for item in sink.messages if OUTSIDE in item.rcpt_tos]
