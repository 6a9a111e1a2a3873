"""The review milter behind `mailmoat serve`, before the attachments milter, over the real
review book (milters/core/review): outbound mail with a file to an outside recipient is held
with the review reason, the sender's notice with its two signed links arrives at the sink;
inbound mail and mail that stays inside pass untouched."""
from __future__ import annotations

import email
import re
import subprocess
import sys
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from milters.core.jis import decode_cp50220
from tests.harness.milter_proc import ROOT
from tests.harness.sink import SinkMessage, SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration
SAMPLE = ROOT / "samples" / "ppap-attachment-ja.eml"
SENDER, OUTSIDE, INSIDE = "hanako@example.jp", "buyer@customer.example", "taro@example.jp"
CONSOLE = "http://127.0.0.1:8026"
POLICY = """\
internal_networks: [127.0.0.0/8]
own_domains: [example.jp]
review: {language: en}
rules:
  - name: files-to-outside-wait
    when: {direction: outbound, outside_recipients: true, attachments: true}
    then: {review: {delay: 10m}}
  - name: outside-recipients-get-a-zip
    when: {direction: outbound, recipient: ["*", "!@example.jp"]}
    then: {attachments: encrypt}
"""


def queue_list(config: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "mta.cli", "queue", "list", "--config",
                           str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def parsed(item: SinkMessage) -> EmailMessage:
    message = email.message_from_bytes(item.data, policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    return message


def text_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",)) or message
    raw = part.get_payload(decode=True)
    assert isinstance(raw, bytes)
    charset = (part.get_content_charset() or "utf-8").lower()
    return decode_cp50220(raw) if charset == "iso-2022-jp" else raw.decode(charset)


@pytest.fixture
def gateway(tmp_path: Path):  # type: ignore[no-untyped-def]
    with SmtpSink() as sink:
        serve = Serve(tmp_path, policy=POLICY, relay=f"smtp:[127.0.0.1]:{sink.port}",
                      milters="milters: [{name: review}, {name: attachments}]\n"
                              f"review: {{console_url: \"{CONSOLE}\", "
                              "token_key_file: var/review-key}\n")
        serve.config.write_text(serve.config.read_text().replace(
            "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]"))
        serve.start()
        try:
            yield serve, sink
        finally:
            serve.stop()


def test_a_file_to_an_outside_recipient_is_held_and_the_sender_gets_two_links(
        gateway) -> None:  # type: ignore[no-untyped-def]
    serve, sink = gateway
    result = run_swaks(serve.port, mail_from=SENDER, rcpt=[OUTSIDE], data_file=SAMPLE)
    assert result.code("DATA_END") == 250, result.transcript
    held = serve.wait_log(r"event=review_held .*queue_id=(\S+) .*review=([0-9a-f]{32}) "
                          r"kind=delay")
    queue_id, review_id = held.group(1), held.group(2)
    listing = queue_list(serve.config)
    assert f"{queue_id}!" in listing, listing
    assert f"(held: mailmoat-review delay {review_id})" in listing, listing
    # The sender's notice (the attachments milter's password notice may come too until
    # the chain stops at a review hold: the next slice).
    notices: list[EmailMessage] = []
    for count in range(1, 4):
        items = sink.wait_for(count, timeout=30)
        notices = [parsed(i) for i in items if i.rcpt_tos == (SENDER,)
                   and "review" in str(parsed(i).get("From", ""))]
        if notices:
            break
    assert len(notices) == 1, [(i.mail_from, i.rcpt_tos) for i in sink.messages]
    notice = notices[0]
    assert notice["Auto-Submitted"] == "auto-generated"
    links = re.findall(rf"{re.escape(CONSOLE)}/review/[A-Za-z0-9_.-]+", text_of(notice))
    assert len(set(links)) == 2, text_of(notice)
    # Held: the outside recipient got nothing.
    assert not [i for i in sink.messages if OUTSIDE in i.rcpt_tos]
    assert "X-Mailmoat-Review" not in str(notice)


def test_inbound_and_internal_mail_pass_untouched_and_a_forged_review_header_goes(
        gateway) -> None:  # type: ignore[no-untyped-def]
    serve, sink = gateway
    forged = ["Subject: inbound", "X-Mailmoat-Review: approve " + "0" * 32]
    inbound = run_swaks(serve.port, mail_from="a@customer.example", rcpt=[INSIDE],
                        xclient_addr="192.0.2.44", header=forged)
    assert inbound.code("DATA_END") == 250, inbound.transcript
    inside = run_swaks(serve.port, mail_from=SENDER, rcpt=[INSIDE], data_file=SAMPLE)
    assert inside.code("DATA_END") == 250, inside.transcript
    items = sink.wait_for(2, timeout=30)
    assert sorted(i.mail_from for i in items) == sorted(["a@customer.example", SENDER])
    for item in items:
        assert item.rcpt_tos == (INSIDE,)
        assert "X-Mailmoat-Review" not in parsed(item)
    assert "event=review_held" not in serve.text()
    assert "(held:" not in queue_list(serve.config)
