"""Outbound review behind a real Postfix (milters only), set up as the recipe says: the
review milter's hold ends Postfix's milter chain, so the message waits in the hold queue as
the sender wrote it; `milter_header_checks` gives it a content filter, the release port, an
smtpd running the attachments milter. `mailmoat postfix-review` (root) releases it with
`postsuper -H` or deletes it with `postsuper -d` when the review is decided: through the
console's links, by a timer, or by an admin's own postsuper. Whoever releases it, it passes
the attachments milter on the way out: the ZIP and its password are made only then.

What a user checks at the sink: before the decision only the review notices exist (no
message, no password); after an approval the message arrives as a ZIP and the password
notice goes too; after a cancel, a rejection or a `postsuper -d` no password ever goes."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from milters.core.review import SqliteReviewBook
from tests.harness.bounded import wait_until
from tests.harness.browser import console_up
from tests.harness.milter_proc import ROOT, MilterProcess
from tests.harness.ports import free_port
from tests.harness.postfix import PostfixInstance, postfix_instance
from tests.harness.review_world import (BOSS, OUTSIDE, SENDER, WAIT, kind_of, kinds, parsed,
                                       review_behind_postfix)
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_console_review_browser import action_of, text_of
from tests.integration.test_service_sandbox import setpriv_caps, unit_service
from tests.unit.test_console_review import field

pytestmark = pytest.mark.integration
POLICY = """\
internal_networks: [127.0.0.0/8]
own_domains: [example.jp]
review: {language: en}
rules:
  - name: approval
    when: {direction: outbound, subject: ["approve"], outside_recipients: true}
    then: {review: {approve: {approvers: [boss@example.jp], timeout: 1h}}}
  - name: short-delay
    when: {direction: outbound, subject: ["delay"], outside_recipients: true}
    then: {review: {delay: 2s}}
  - name: long-delay
    when: {direction: outbound, subject: ["later"], outside_recipients: true}
    then: {review: {delay: 1h}}
  - name: confirm-or-lose-it
    when: {direction: outbound, subject: ["confirm"], outside_recipients: true}
    then: {review: {confirm: true, timeout: 1h}}
  - name: outside-recipients-get-a-zip
    when: {direction: outbound, recipient: ["*", "!@example.jp"]}
    then: {attachments: encrypt}
"""


@dataclass
class World:
    postfix: PostfixInstance
    sink: SmtpSink
    milters: list[MilterProcess]
    runner: subprocess.Popen[bytes]
    runner_log: Path
    base: str  # the console
    dir: Path

    def log(self) -> str:
        return self.runner_log.read_text(errors="replace")

    def wait_log(self, pattern: str) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            assert self.runner.poll() is None, self.log()
            return re.search(pattern, self.log())
        return wait_until(found, WAIT, lambda: f"no {pattern!r} in:\n{self.log()}")

    def book(self) -> SqliteReviewBook:
        return SqliteReviewBook(str(self.dir / "state-review.db"))

    def zipped_count(self) -> int:
        return len(re.findall(r"event=attachments ", self.milters[1].log_text()))

    def postsuper(self, *args: str) -> str:
        done = subprocess.run(["postsuper", "-c", str(self.postfix.config_dir), *args],
                              capture_output=True, text=True, timeout=WAIT, check=True)
        return done.stderr


def message(subject: str) -> bytes:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = SENDER, OUTSIDE, subject
    mail["Message-ID"] = f"<{time.time_ns()}@example.jp>"
    mail.set_content("The quotation is attached.\n")
    mail.add_attachment(b"%PDF-1.4 quotation\n" * 50, maintype="application",
                        subtype="pdf", filename="quotation.pdf")
    return bytes(mail).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def as_the_unit() -> list[str]:
    """The runner as its unit starts it: root with only the unit's bounding set, no new
    privileges (postqueue's setgid bit does nothing then)."""
    service = unit_service("mailmoat-postfix-review.service")
    assert service["User"] == "root" and service["NoNewPrivileges"] == "yes"
    caps = setpriv_caps(service["CapabilityBoundingSet"])
    return ["setpriv", "--bounding-set", f"-all{caps}", "--inh-caps", "-all",
            "--no-new-privs", "--"]


def start_runner(directory: Path, postfix: PostfixInstance) -> subprocess.Popen[bytes]:
    """`mailmoat postfix-review`, as its unit starts it, logging to postfix-review.log."""
    with open(directory / "postfix-review.log", "ab") as out:
        return subprocess.Popen(
            [*as_the_unit(), sys.executable, "-m", "mta.cli", "postfix-review", "--config",
             str(directory / "config.yaml"), "--postfix-config", str(postfix.config_dir)],
            cwd=directory, stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(ROOT)})


def restart_runner(world: World) -> subprocess.Popen[bytes]:
    return start_runner(world.dir, world.postfix)


def start_world(tmp_path: Path, queue_run_delay: str = "1s",
                digest: str = "") -> Iterator[World]:
    reinject, release, console = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{console}"
    (tmp_path / "policy.yaml").write_text(POLICY)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"gateway: {{hostname: mx.example.jp, user: root, "
        f"reinject_listen: 127.0.0.1:{reinject}}}\n"
        "store: sqlite:///state.db\npolicy: policy.yaml\n"
        f"review: {{console_url: \"{base}\", token_key_file: var/review-key{digest}}}\n"
        f"console: {{listen: '127.0.0.1:{console}'}}\n")
    milters = [MilterProcess(name, config, tmp_path).start()
               for name in ("review", "attachments")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    console_log = tmp_path / "console.log"
    with open(console_log, "wb") as out:
        console_proc = subprocess.Popen([sys.executable, "-m", "mta.cli", "console",
                                         "--config", str(config)], cwd=tmp_path,
                                        stdout=out, stderr=out, env=env)
    try:
        with SmtpSink() as sink, postfix_instance(
                tmp_path, relay_port=sink.port,
                smtpd_milters=" ".join(m.socket_spec for m in milters),
                reinject_port=reinject, relay_domains="example.jp, customer.example",
                **review_behind_postfix(release, milters[1].socket_spec,
                                        queue_run_delay)) as postfix:
            runner_log = tmp_path / "postfix-review.log"
            world = World(postfix, sink, milters, start_runner(tmp_path, postfix), runner_log,
                          base, tmp_path)
            world.wait_log(r"postfix-review: watching")
            def console_ready() -> bool:
                assert console_proc.poll() is None, console_log.read_text()
                return console_up(base)
            wait_until(console_ready, WAIT, console_log.read_text)
            try:
                yield world
            finally:
                world.runner.terminate()
                world.runner.wait(WAIT)
            assert "Traceback" not in world.log(), world.log()
    finally:
        console_proc.terminate()
        console_proc.wait(WAIT)
        for milter in milters:
            milter.stop()
    for milter in milters:
        assert "Traceback" not in milter.log_text(), milter.log_text()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from start_world(tmp_path)


def send_held(world: World, subject: str, notices: int) -> tuple[str, str]:
    """Send; (Postfix queue ID, review ID) once the message is on hold and the review
    notices (and nothing else) are at the sink."""
    held_line = r"event=review_held .*queue_id=(\S+) .*review=([0-9a-f]{32})"
    before = len(re.findall(held_line, world.milters[0].log_text()))
    path = world.dir / f"{time.time_ns()}.eml"
    path.write_bytes(message(subject))
    result = run_swaks(world.postfix.smtp_port, mail_from=SENDER, rcpt=[OUTSIDE],
                       data_file=path)
    assert result.code("DATA_END") == 250, result.transcript
    found = wait_until(lambda: re.findall(held_line, world.milters[0].log_text())[before:],
                       WAIT, world.milters[0].log_text)
    queue_id, review_id = found[-1]
    world.sink.wait_for(notices, timeout=WAIT)
    wait_until(lambda: {m["queue_id"]: m["queue_name"] for m in world.postfix.queue()}.get(
        queue_id) == "hold", WAIT, lambda: str(world.postfix.queue()))
    time.sleep(2.5)  # two runner rounds: a hold must not leak anything meanwhile
    assert kinds(world.sink) == ["review"] * notices, kinds(world.sink)
    assert world.zipped_count() == 0  # Postfix ended the chain at the hold
    return queue_id, review_id


def link_for(world: World, person: str, action: str) -> str:
    [notice] = [m for m in world.sink.messages if m.rcpt_tos == (person,)
                and kind_of(m) == "review"]
    links = re.findall(rf"{re.escape(world.base)}/review/[A-Za-z0-9_.-]+",
                       text_of(notice.data))
    [found] = [link for link in links if action_of(link) == action]
    return found


def press(link: str, reason: str = "") -> httpx.Response:
    with httpx.Client(timeout=10) as client:
        page = client.get(link)
        assert page.status_code == 200, page.text
        return client.post(link, data={"form_token": field(page.text, "form_token"),
                                       "reason": reason})


def expire_now(world: World, review_id: str) -> None:
    """The hour passes: the review's deadline moved to now in its book (the runner, its
    own process, reads the clock; the rule's timeout cannot be under a minute)."""
    with sqlite3.connect(world.dir / "state-review.db") as db:
        (body,) = db.execute("SELECT body FROM review WHERE id = ?", (review_id,)).fetchone()
        record = json.loads(body)
        record["deadline"] = time.time() - 1
        db.execute("UPDATE review SET deadline = ?, body = ? WHERE id = ?",
                   (record["deadline"], json.dumps(record), review_id))


def zipped(world: World) -> EmailMessage:
    [outside] = [m for m in world.sink.messages if kind_of(m) == "outside"]
    return parsed(outside)


def test_approved_by_link_the_message_leaves_zipped_with_its_password_notice(
        world: World) -> None:
    queue_id, review_id = send_held(world, "approve: quotation", notices=2)
    link = link_for(world, BOSS, "approve")
    assert httpx.get(link, timeout=10).status_code == 200  # a mail scanner follows it
    time.sleep(2.5)
    assert kinds(world.sink) == ["review", "review"]  # the GET changed nothing
    assert world.postfix.queue()[0]["queue_name"] == "hold"
    assert press(link).status_code == 200
    world.wait_log(rf"event=review_released .*queue_id={queue_id}")
    world.sink.wait_for(4, timeout=WAIT)
    assert kinds(world.sink) == ["outside", "password", "review", "review"]
    mail = zipped(world)
    names = [p.get_filename() for p in mail.iter_attachments() if p.get_filename()]
    assert len(names) == 1 and names[0].endswith(".zip"), names
    assert mail.get_all("X-Mailmoat-Review") is None  # smtp_header_checks of the recipe
    [password] = [m for m in world.sink.messages if kind_of(m) == "password"]
    assert password.rcpt_tos == (SENDER,)
    assert world.zipped_count() == 1  # on the way out, once
    record = world.book().get(review_id)
    assert record is not None and record.state == "approved" and record.carried_out
    assert world.postfix.queue() == [] or all(m["queue_id"] != queue_id
                                              for m in world.postfix.queue())
    # The same link again: refused, and nothing more goes.
    with httpx.Client(timeout=10) as client:
        again = client.get(link)
    assert again.status_code == 409
    time.sleep(2.5)
    assert len(world.sink.messages) == 4


def test_cancelled_in_its_delay_the_message_is_deleted_and_no_password_goes(
        world: World) -> None:
    queue_id, review_id = send_held(world, "later: wrong customer", notices=1)
    assert press(link_for(world, SENDER, "cancel")).status_code == 200
    world.wait_log(rf"event=review_dropped .*queue_id={queue_id}")
    world.sink.wait_for(2, timeout=WAIT)
    time.sleep(2.5)
    assert kinds(world.sink) == ["review", "review"]  # the notice, then the result
    assert all(m["queue_id"] != queue_id for m in world.postfix.queue())
    assert world.zipped_count() == 0


def test_a_rejection_tells_the_sender_the_reason_and_sends_nothing_else(
        world: World) -> None:
    queue_id, _ = send_held(world, "approve: old version", notices=2)
    reason = "古い版です <b>v2</b> & 再送を"
    assert press(link_for(world, BOSS, "reject"), reason).status_code == 200
    world.wait_log(rf"event=review_dropped .*queue_id={queue_id}")
    world.sink.wait_for(3, timeout=WAIT)
    time.sleep(2.5)
    assert kinds(world.sink) == ["review", "review", "review"]
    told = [m for m in world.sink.messages if m.rcpt_tos == (SENDER,)][-1]
    assert reason in text_of(told.data)


def test_a_delay_ends_and_the_message_goes_once(world: World) -> None:
    queue_id, _ = send_held(world, "delay: quotation", notices=1)
    world.wait_log(rf"event=review_released .*queue_id={queue_id}")
    world.sink.wait_for(3, timeout=WAIT)
    time.sleep(2.5)
    assert kinds(world.sink) == ["outside", "password", "review"]


def test_an_unanswered_confirmation_expires_and_the_message_is_deleted(
        world: World) -> None:
    queue_id, review_id = send_held(world, "confirm: two customers", notices=1)
    expire_now(world, review_id)
    world.wait_log(rf"event=review_dropped .*queue_id={queue_id}")
    world.sink.wait_for(2, timeout=WAIT)
    time.sleep(2.5)
    assert kinds(world.sink) == ["review", "review"]
    record = world.book().get(review_id)
    assert record is not None and record.state == "expired" and record.carried_out
    assert all(m["queue_id"] != queue_id for m in world.postfix.queue())


def test_a_delay_that_ends_while_the_runner_is_stopped_is_sent_once_after_its_restart(
        world: World) -> None:
    world.runner.terminate()
    world.runner.wait(WAIT)
    queue_id, _ = send_held(world, "delay: while the runner is down", notices=1)
    time.sleep(3)  # the delay (2s) is over; nothing may move without the runner
    assert kinds(world.sink) == ["review"]
    assert world.postfix.queue()[0]["queue_name"] == "hold"
    world.runner = restart_runner(world)
    world.wait_log(rf"event=review_released .*queue_id={queue_id}")
    world.sink.wait_for(3, timeout=WAIT)
    time.sleep(2.5)
    assert kinds(world.sink) == ["outside", "password", "review"]
    assert len(re.findall(rf"event=review_released .*queue_id={queue_id}", world.log())) == 1


def test_postsuper_d_by_hand_withdraws_the_review_and_its_password_never_goes(
        world: World) -> None:
    queue_id, review_id = send_held(world, "approve: by hand", notices=2)
    assert "Deleted: 1 message" in world.postsuper("-d", queue_id, "hold")
    world.wait_log(rf"event=review_withdrawn .*queue_id={queue_id}")
    time.sleep(2.5)
    assert kinds(world.sink) == ["review", "review"]
    record = world.book().get(review_id)
    assert record is not None and record.state == "cancelled" and record.carried_out
    assert world.zipped_count() == 0


@pytest.fixture
def slow_queue_world(tmp_path: Path) -> Iterator[World]:
    # Postfix's default: mail released by postsuper -H waits in the deferred queue for
    # the next queue run, as it does on a production Postfix.
    yield from start_world(tmp_path, queue_run_delay="300s")


def test_postsuper_H_by_hand_releases_it_and_the_password_notice_follows(
        slow_queue_world: World) -> None:
    world = slow_queue_world
    queue_id, review_id = send_held(world, "approve: released by the admin", notices=2)
    assert "Released from hold: 1 message" in world.postsuper("-H", queue_id)
    world.wait_log(rf"event=review_released_by_hand .*queue_id={queue_id}")
    world.wait_log(rf"event=review_released .*queue_id={queue_id}")
    world.sink.wait_for(4, timeout=WAIT)
    assert kinds(world.sink) == ["outside", "password", "review", "review"]
    assert zipped(world).get_all("X-Mailmoat-Review") is None
    record = world.book().get(review_id)
    assert record is not None and record.state == "approved" and record.carried_out
    assert record.decisions[-1].who == "postsuper"


def test_a_release_port_whose_milter_is_down_defers_and_never_sends_it_bare(
        world: World) -> None:
    """Dying part: the attachments milter behind the release port is down when the message
    is released. Postfix gets 451 there (milter_default_action = tempfail) and keeps the
    message deferred; nothing leaves unzipped. Once the milter is back it goes, zipped."""
    queue_id, _ = send_held(world, "approve: while the milter is down", notices=2)
    attachments = world.milters[1]
    attachments.stop()
    assert press(link_for(world, BOSS, "approve")).status_code == 200
    world.wait_log(rf"event=review_released .*queue_id={queue_id}")
    world.postfix.wait_for_log(rf"{queue_id}: .*relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+.* "
                               r"status=deferred", timeout=WAIT)
    time.sleep(2.5)
    assert kinds(world.sink) == ["review", "review"]  # no bare message, no password
    assert [m["queue_name"] for m in world.postfix.queue()] == ["deferred"]
    world.milters[1] = MilterProcess("attachments", attachments.config, world.dir,
                                     port=attachments.port).start()
    world.postfix.flush()
    world.sink.wait_for(4, timeout=WAIT)
    assert kinds(world.sink) == ["outside", "password", "review", "review"]
    names = [p.get_filename() for p in zipped(world).iter_attachments()]
    assert any(name and name.endswith(".zip") for name in names), names


def test_a_forged_review_header_does_not_route_mail_through_the_release_port(
        world: World) -> None:
    """A client writes X-Mailmoat-Review itself on mail no rule holds: the review milter
    removes it, and Postfix's milter_header_checks (which reads only what milters add) gives
    the message no content filter: it goes out once, through the normal chain."""
    raw = message("an ordinary quotation")
    forged = b"X-Mailmoat-Review: approve " + b"0" * 32 + b"\r\n"
    path = world.dir / "forged.eml"
    path.write_bytes(forged + raw)
    result = run_swaks(world.postfix.smtp_port, mail_from=SENDER, rcpt=[OUTSIDE],
                       data_file=path)
    assert result.code("DATA_END") == 250, result.transcript
    world.sink.wait_for(2, timeout=WAIT)  # the message and its password notice
    time.sleep(2.5)
    assert kinds(world.sink) == ["outside", "password"]
    log = world.postfix.log_text()
    release_port = re.search(r"FILTER smtp:\[127\.0\.0\.1\]:(\d+)",
                             world.postfix.postconf("milter_header_checks")).group(1)
    assert f"127.0.0.1]:{release_port}" not in log, log
    assert world.zipped_count() == 1
    assert "milter-hold" not in log


DIGEST_LEAD = 15  # seconds from the start to the digest time: the hold is in place by then


@pytest.fixture
def digest_world(tmp_path: Path) -> Iterator[World]:
    at = time.strftime("%H:%M:%S", time.localtime(time.time() + DIGEST_LEAD))
    yield from start_world(tmp_path, digest=f", digest: {{at: \"{at}\", every: 1d, "
                                              "domains: [example.jp]}")


def test_the_digest_goes_out_from_the_postfix_runner_and_its_link_approves(
        digest_world: World) -> None:
    """Behind Postfix there is no serve: postfix-review sends review.digest at its time.
    The approver's digest carries a fresh approve link; using it releases the message."""
    world = digest_world
    queue_id, review_id = send_held(world, "approve: from the digest", notices=2)
    world.wait_log(r"event=digest_run .*sent=2 failed=0")
    found = [m for m in world.sink.messages
             if parsed(m).get("X-Mailmoat-Notice") == "review-digest"]
    assert sorted(m.rcpt_tos for m in found) == [(BOSS,), (SENDER,)]
    [boss] = [m for m in found if m.rcpt_tos == (BOSS,)]
    links = re.findall(rf"{re.escape(world.base)}/review/[A-Za-z0-9_.-]+", text_of(boss.data))
    [approve] = [link for link in links if action_of(link) == "approve"]
    assert press(approve).status_code == 200
    world.wait_log(rf"event=review_released .*queue_id={queue_id}")
    world.sink.wait_for(6, timeout=WAIT)
    assert sorted(kind_of(m) for m in world.sink.messages).count("outside") == 1
    record = world.book().get(review_id)
    assert record is not None and record.state == "approved" and record.carried_out


def test_approvals_decided_together_leave_hold_in_one_postsuper(world: World) -> None:
    """Two approvals in one round (an approver working through a digest): one `postsuper
    -H -` releases both (Postfix logs both IDs under one postsuper process), both go zipped."""
    first, first_review = send_held(world, "approve: first", notices=2)
    second, second_review = send_held(world, "approve: second", notices=4)
    book = world.book()
    for review_id in (first_review, second_review):
        book.decide(review_id, BOSS, "127.0.0.1", "approve")  # as the link page does
    for queue_id in (first, second):
        world.wait_log(rf"event=review_released .*queue_id={queue_id}")
    world.sink.wait_for(8, timeout=WAIT)
    assert sorted(kind_of(m) for m in world.sink.messages).count("outside") == 2
    released = re.findall(r"postsuper\[(\d+)\]: (\w+): released from hold",
                          world.postfix.log_text())
    assert sorted(queue_id for _, queue_id in released) == sorted([first, second])
    assert len({pid for pid, _ in released}) == 1, released
