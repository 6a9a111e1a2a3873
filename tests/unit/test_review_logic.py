"""The review milter's decision at end of message over a stand-in book (tests/harness/
review_standin.py): what is held and with which reason and header, who gets which links,
what passes untouched, forged review headers, failures that must not hold mail unseen."""
from __future__ import annotations

from email.message import EmailMessage

import pytest

from milters.core.edits import AddHeader, ChangeHeader, Quarantine
from milters.core.errors import MailmoatError
from milters.core.message import Envelope, Message, Recipient
from milters.core.policy.document import load_policy_text
from milters.core.reinject import ReinjectError
from milters.core.verdict import Action
from milters.review.logic import REVIEW_HEADER, UNREADABLE, ReviewChecker, attachment_names
from mta.cli import EXTENSIONS
from tests.harness.review_standin import PREFIX, Standin

NOW = 1_800_000_000.0
POLICY = """\
internal_networks: [10.0.0.0/8]
own_domains: [example.jp]
review: {language: en}
rules:
  - name: big-to-outside
    when: {direction: outbound, outside_recipients: true, size: {over: 1MB}}
    then: {review: {approve: {approvers: [boss@example.jp, role:admin], timeout: 8h}}}
  - name: files-to-outside
    when: {direction: outbound, outside_recipients: true, attachments: true}
    then: {review: {delay: 5m}}
  - name: many-domains
    when: {direction: outbound, outside_domains: {min: 2}}
    then: {review: {confirm: true, timeout: 2h}}
"""


def mail(attachment: bool = True, extra_headers: tuple[tuple[str, str], ...] = (),
         body_size: int = 0) -> bytes:
    msg = EmailMessage()
    msg["From"] = "hanako@example.jp"
    msg["Subject"] = "見積書"
    msg["Message-ID"] = "<m1@example.jp>"
    for name, value in extra_headers:
        msg[name] = value
    msg.set_content("body\n" + "x" * body_size)
    if attachment:
        msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf",
                           filename="見積.pdf")
    return msg.as_bytes().replace(b"\n", b"\r\n")


class Captured:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, list[str], bytes]] = []
        self.fail = fail

    def __call__(self, listen: str, mail_from: str, rcpts: list[str], raw: bytes,
                 timeout: float) -> str:
        if self.fail:
            raise ReinjectError("re-injection refused")
        self.sent.append((mail_from, list(rcpts), raw))
        return "250 ok"


def run(raw: bytes, rcpts: list[str], client: str = "10.1.0.5", policy: str = POLICY,
        standin: Standin | None = None, send: Captured | None = None,
        sender: str = "hanako@example.jp"):  # type: ignore[no-untyped-def]
    standin = standin or Standin()
    send = send or Captured()
    checker = ReviewChecker("mx.example.jp", "127.0.0.1:10026", standin.kit(),
                            clock=lambda: NOW, send=send)
    env = Envelope(client_ip=client, mail_from=sender, queue_id="Q1",
                   recipients=[Recipient(r) for r in rcpts])
    result = checker.check(Message(raw=raw, envelope=env),
                           load_policy_text(policy, EXTENSIONS))
    return result, standin, send


def test_files_to_an_outside_recipient_are_held_with_the_review_reason_and_header() -> None:
    result, standin, send = run(mail(), ["buyer@customer.example", "taro@example.jp"])
    (record,) = standin.book.records.values()
    assert record.kind == "delay" and record.queue_id == "Q1"
    assert record.deadline == NOW + 300 and record.on_timeout == "send"
    assert record.attachments == ("見積.pdf",) and record.subject == "見積書"
    assert record.outside == ("buyer@customer.example",)
    assert record.message_id == "<m1@example.jp>" and record.language == "en"
    assert result.verdict.action is Action.CONTINUE
    assert Quarantine(f"{PREFIX} delay {record.id}") in result.edits
    assert AddHeader(REVIEW_HEADER, f"delay {record.id}") in result.edits


def test_the_sender_gets_one_notice_with_send_now_and_cancel_links_bound_to_them() -> None:
    _, standin, send = run(mail(), ["buyer@customer.example"])
    (record,) = standin.book.records.values()
    assert [(f, r) for f, r, _ in send.sent] == [("", ["hanako@example.jp"])]
    assert standin.links == [(record.id, "hanako@example.jp", "send_now", record.deadline),
                             (record.id, "hanako@example.jp", "cancel", record.deadline)]
    assert b"send_now https://console.test/review/send_now." in send.sent[0][2]


def test_two_outside_domains_ask_the_sender_to_confirm() -> None:
    _, standin, send = run(mail(attachment=False), ["a@one.example", "b@two.example"])
    (record,) = standin.book.records.values()
    assert record.kind == "confirm" and record.deadline == NOW + 7200
    assert record.on_timeout == "cancel"
    assert [a for _, _, a, _ in standin.links] == ["confirm", "cancel"]


def test_an_approval_goes_to_the_first_approver_with_roles_resolved_in_order() -> None:
    standin = Standin(roles={"admin": ["root@example.jp", "Boss@example.jp"]})
    _, standin, send = run(mail(body_size=1_100_000), ["buyer@customer.example"],
                           standin=standin)
    (record,) = standin.book.records.values()
    assert record.kind == "approve"
    assert record.approvers == ("boss@example.jp", "root@example.jp")  # each once, in order
    # The approver decides; the sender learns it waits and may withdraw it.
    assert [r for _, r, _ in send.sent] == [["boss@example.jp"], ["hanako@example.jp"]]
    assert [(p, a) for _, p, a, _ in standin.links] == [
        ("boss@example.jp", "approve"), ("boss@example.jp", "reject"),
        ("hanako@example.jp", "cancel")]


def test_the_sender_is_never_their_own_approver_without_self_approval() -> None:
    standin = Standin(roles={"admin": ["hanako@example.jp"]})
    policy = POLICY.replace("approvers: [boss@example.jp, role:admin]",
                            "approvers: [role:admin, boss@example.jp]")
    _, standin, send = run(mail(body_size=1_100_000), ["buyer@customer.example"],
                           standin=standin, policy=policy)
    (record,) = standin.book.records.values()
    assert record.approvers == ("boss@example.jp",)
    assert [r for _, r, _ in send.sent] == [["boss@example.jp"], ["hanako@example.jp"]]


def test_an_approval_nobody_can_give_is_tempfailed_not_held_unseen() -> None:
    policy = POLICY.replace("approvers: [boss@example.jp, role:admin]", "approvers: [role:admin]")
    result, standin, send = run(mail(body_size=1_100_000), ["buyer@customer.example"],
                                policy=policy)
    assert result.verdict.action is Action.TEMPFAIL
    assert not standin.book.records and not send.sent
    assert not any(isinstance(e, Quarantine) for e in result.edits)


@pytest.mark.parametrize("rcpts,client", [
    (["taro@example.jp", "jiro@sales.example.jp"], "10.1.0.5"),  # internal only
    (["taro@example.jp"], "192.0.2.9"),  # inbound
])
def test_internal_and_inbound_mail_pass_untouched(rcpts: list[str], client: str) -> None:
    result, standin, send = run(mail(), rcpts, client=client)
    assert result.verdict.action is Action.CONTINUE and result.edits == []
    assert not standin.book.records and not send.sent


def test_a_bounce_is_never_held() -> None:
    result, standin, _ = run(mail(), ["buyer@customer.example"], sender="")
    assert result.edits == [] and not standin.book.records


def test_a_forged_review_header_is_removed_from_mail_that_passes_and_mail_that_is_held() -> None:
    forged = (("X-Mailmoat-Review", "approve 0123"), ("x-mailmoat-review", "delay x"))
    result, _, _ = run(mail(extra_headers=forged), ["taro@example.jp"], client="192.0.2.9")
    assert result.edits == [ChangeHeader(REVIEW_HEADER, 2, ""),
                            ChangeHeader(REVIEW_HEADER, 1, "")]
    result, standin, _ = run(mail(extra_headers=forged), ["buyer@customer.example"])
    (record,) = standin.book.records.values()
    assert result.edits[:2] == [ChangeHeader(REVIEW_HEADER, 2, ""),
                                ChangeHeader(REVIEW_HEADER, 1, "")]
    assert result.edits[-1] == AddHeader(REVIEW_HEADER, f"delay {record.id}")


def test_a_notice_the_mta_refuses_tempfails_the_message() -> None:
    result, _, _ = run(mail(), ["buyer@customer.example"], send=Captured(fail=True))
    assert result.verdict.action is Action.TEMPFAIL
    assert result.verdict.reply is not None and result.verdict.reply.code == 451
    assert not any(isinstance(e, Quarantine) for e in result.edits)


def test_a_book_that_fails_tempfails_the_message() -> None:
    standin = Standin()
    standin.book.fail = MailmoatError("database is locked")
    result, _, send = run(mail(), ["buyer@customer.example"], standin=standin)
    assert result.verdict.action is Action.TEMPFAIL and not send.sent


def test_mime_that_cannot_be_scanned_counts_as_having_attachments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import milters.review.logic as logic

    def broken(raw: bytes) -> None:
        raise RecursionError("nested too deep")
    monkeypatch.setattr(logic, "locate_attachments", broken)
    result, standin, _ = run(mail(attachment=False), ["buyer@customer.example"])
    (record,) = standin.book.records.values()
    assert record.attachments == (UNREADABLE,)


def test_attachment_names_are_decoded_and_nameless_files_named() -> None:
    msg = EmailMessage()
    msg.set_content("hi")
    msg.add_attachment(b"x", maintype="application", subtype="octet-stream")
    msg.add_attachment(b"y", maintype="application", subtype="pdf", filename="契約 <b>.pdf")
    raw = msg.as_bytes().replace(b"\n", b"\r\n")
    assert attachment_names(Message(raw=raw)) == ["(no name)", "契約 <b>.pdf"]
