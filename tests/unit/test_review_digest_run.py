"""The digests from a gateway's config: a real spool and SQLite review book, the CLI sending
through SMTP to the test sink, and the schedule's periods and its state across restarts."""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from milters.core.config import load_config
from milters.core.review import SqliteReviewBook, new_review, review_reason
from mta.cli import main
from mta.queue.spool import Envelope, Queue, RecipientState
from mta.review.digest_run import build_digests
from mta.review.digest_timer import DigestTimer, period_start
from tests.harness.sink import SmtpSink

SENDER, BOSS = "taro@example.jp", "boss@example.jp"
# "請求書のご案内" in ISO-2022-JP B words: decoded in the digest
JIS_SUBJECT = "=?ISO-2022-JP?B?GyRCQEE1YT1xJE4kNDBGRmIbKEI=?="


def gateway(tmp_path: Path, extra: str = "", reinject: str = "127.0.0.1:1") -> Path:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"""\
store: sqlite:///{tmp_path}/state.db
gateway:
  hostname: mx.example.jp
  reinject_listen: "{reinject}"
  relay_domains: [example.jp]
  queue: {{dir: {tmp_path}/spool}}
review:
  console_url: "https://mail.example.jp:8026"
  token_key_file: {tmp_path}/review-key
{extra}""")
    return config


def hold(queue: Queue, sender: str, rcpts: list[str], reason: str, subject: str,
         body: bytes = b"hello\r\n") -> str:
    raw = f"From: {sender}\r\nSubject: {subject}\r\n\r\n".encode() + body
    envelope = Envelope(queue_id=f"Q{time.time_ns()}", sender=sender,
                        recipients=[RecipientState(r) for r in rcpts], received_at=time.time(),
                        hold_reason=reason, size=len(raw))
    return queue.enqueue(raw, envelope)


def world(tmp_path: Path) -> tuple[Path, str, str]:
    config = gateway(tmp_path)
    queue = Queue(tmp_path / "spool")
    book = SqliteReviewBook(str(tmp_path / "state-review.db"))
    now = time.time()
    record = book.create(new_review(queue_id="R1", kind="approve", sender=SENDER,
                                    recipients=["x@partner.example"], subject="見積書",
                                    now=now, timeout=3600, approvers=[BOSS], language="en"))
    held_review = hold(queue, SENDER, ["x@partner.example"], review_reason(record), "見積書")
    quarantined = hold(queue, "spoof@outside.example", [SENDER, "hanako@example.jp"],
                       "dmarc: p=quarantine", JIS_SUBJECT, body=b"x" * (5 * 1024 * 1024))
    book.close()
    return config, held_review, quarantined


def test_the_review_hold_is_listed_once_with_links_and_the_quarantine_with_its_subject(
        tmp_path: Path) -> None:
    config, held_review, quarantined = world(tmp_path)
    people = {d.person: d for d in build_digests(load_config(config), now=time.time())}
    assert sorted(people) == [BOSS, "hanako@example.jp", SENDER]
    mine = people[SENDER]
    assert [e.record.queue_id for e in mine.reviews] == ["R1"]
    # The review hold is not listed again among the quarantined mail: only the DMARC one.
    assert [e.queue_id for e in mine.held] == [quarantined]
    assert mine.held[0].subject == "請求書のご案内"
    assert mine.held[0].link == f"https://mail.example.jp:8026/held/{quarantined}"
    assert people["hanako@example.jp"].held[0].recipients == ("hanako@example.jp",)
    assert list(people[BOSS].approvals[0].links) == ["approve", "reject"]
    assert held_review not in {e.queue_id for d in people.values() for e in d.held}


def test_show_prints_one_persons_digest_and_sends_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, _, quarantined = world(tmp_path)
    assert main(["digest", "show", "--for", "Hanako@Example.jp", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "To: hanako@example.jp" in out and "Subject: " in out
    assert quarantined in out and SENDER not in out.split("\n\n", 1)[1]
    assert main(["digest", "show", "--for", "nobody@example.jp", "--config",
                 str(config)]) == 0
    assert "nothing waits on nobody@example.jp" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["digest", "show", "--for", "not an address", "--config", str(config)])
    assert exited.value.code == 2


def test_send_goes_through_smtp_to_each_person_and_says_who(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, _ = world(tmp_path)
    with SmtpSink() as sink:
        config = gateway(tmp_path, reinject=f"127.0.0.1:{sink.port}")
        assert main(["digest", "send", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        sink.wait_for(3, timeout=10)
        assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(
            [BOSS, SENDER, "hanako@example.jp"])
        assert {m.mail_from for m in sink.messages} <= {"", "<>"}, sink.messages
        assert f"digest: sent to {BOSS} (approvals 1)" in out
        assert f"digest: sent to {SENDER} (reviews 1, held 1)" in out
        sink.clear()
        assert main(["digest", "send", "--to", BOSS, "--config", str(config)]) == 0
        sink.wait_for(1, timeout=10)
        assert [m.rcpt_tos for m in sink.messages] == [(BOSS,)]


def test_send_with_the_mta_down_fails_clearly(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config, _, _ = world(tmp_path)  # reinject_listen 127.0.0.1:1: nobody listens
    assert main(["digest", "send", "--to", BOSS, "--config", str(config)]) == 1
    assert f"NOT sent to {BOSS}" in capsys.readouterr().err


def test_a_bad_digest_block_names_file_line_and_column(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    config = gateway(tmp_path, '  digest: {at: "8:75", to: []}\n')
    assert main(["digest", "send", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}:10:" in err and "review.digest.at" in err and "review.digest.to" in err


def local(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").astimezone().timestamp()


def test_periods_start_at_the_local_time_and_follow_every() -> None:
    day = 86400.0
    assert period_start(local("2026-03-10 09:00:00"), (8, 30, 0), day) == \
        local("2026-03-10 08:30:00")
    assert period_start(local("2026-03-10 08:00:00"), (8, 30, 0), day) == \
        local("2026-03-09 08:30:00")
    assert period_start(local("2026-03-10 21:00:00"), (8, 30, 0), 12 * 3600) == \
        local("2026-03-10 20:30:00")
    assert period_start(local("2026-03-10 07:00:00"), (8, 30, 0), 12 * 3600) == \
        local("2026-03-09 20:30:00")
    two = period_start(local("2026-03-10 09:00:00"), (8, 30, 0), 2 * day)
    assert two <= local("2026-03-10 09:00:00") and (local("2026-03-10 09:00:00") - two) < 2 * day


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def timer(tmp_path: Path, clock: Clock, runs: list[float]) -> DigestTimer:
    config = load_config(gateway(tmp_path, '  digest: {at: "08:30"}\n'))
    assert config.review.digest is not None
    return DigestTimer(config, config.review.digest, tmp_path / "digest-state.json",
                       clock=clock, run=runs.append)


def poke_all(timer_: DigestTimer) -> None:
    async def go() -> None:
        timer_.poke()
        await timer_.stop()
    asyncio.run(go())


def test_once_per_period_not_on_a_fresh_start_and_once_after_a_down_time(
        tmp_path: Path) -> None:
    runs: list[float] = []
    clock = Clock(local("2026-03-10 09:00:00"))
    first = timer(tmp_path, clock, runs)
    poke_all(first)
    assert runs == []  # a fresh install waits for the next 08:30
    clock.now = local("2026-03-11 08:30:05")
    poke_all(first)
    poke_all(first)
    assert runs == [local("2026-03-11 08:30:00")]
    # Restarted the same day: nothing again.
    again = timer(tmp_path, clock, runs)
    clock.now = local("2026-03-11 17:00:00")
    poke_all(again)
    assert len(runs) == 1
    # Down over two mornings: one digest when it starts, not two.
    clock.now = local("2026-03-13 10:00:00")
    later = timer(tmp_path, clock, runs)
    poke_all(later)
    poke_all(later)
    assert runs[1:] == [local("2026-03-13 08:30:00")]
    state = json.loads((tmp_path / "digest-state.json").read_text())
    assert state["period"] == local("2026-03-13 08:30:00")


def test_an_unreadable_state_file_never_means_a_second_digest(tmp_path: Path) -> None:
    runs: list[float] = []
    clock = Clock(local("2026-03-10 09:00:00"))
    (tmp_path / "digest-state.json").write_text("{not json")
    poke_all(timer(tmp_path, clock, runs))
    assert runs == []
    clock.now = local("2026-03-11 09:00:00")
    poke_all(timer(tmp_path, clock, runs))
    assert runs == [local("2026-03-11 08:30:00")]


def test_a_person_whose_address_cannot_be_mailed_fails_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mta.review.digest_run import send_digests
    config, _, _ = world(tmp_path)
    queue = Queue(tmp_path / "spool")
    hold(queue, "x@outside.example", ["太郎@example.jp"], "dmarc", "s")  # SMTPUTF8 local part
    loaded = load_config(config)
    found = build_digests(loaded, now=time.time())
    assert "太郎@example.jp" in {d.person for d in found}
    went: list[list[str]] = []
    sent, failed = send_digests(loaded, found, time.time(),
                                send=lambda listen, sender, to, raw, timeout: went.append(to))
    assert [d.person for d in failed] == ["太郎@example.jp"]
    assert sorted(to[0] for to in went) == sorted([BOSS, "hanako@example.jp", SENDER])
    assert "digest_failed" in caplog.text and "太郎@example.jp" in caplog.text


def test_behind_postfix_there_is_no_spool_and_none_is_made(tmp_path: Path) -> None:
    config = load_config(gateway(tmp_path))
    assert build_digests(config, now=time.time()) == []
    assert not (tmp_path / "spool").exists() and not (tmp_path / "state-review.db").exists()


def test_a_state_file_that_cannot_be_written_is_logged_once_and_sends_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs: list[float] = []
    clock = Clock(local("2026-03-10 09:00:00"))
    config = load_config(gateway(tmp_path, '  digest: {at: "08:30"}\n'))
    assert config.review.digest is not None
    blocked = DigestTimer(config, config.review.digest, tmp_path / "no-dir" / "state.json",
                          clock=clock, run=runs.append)
    for _ in range(3):
        poke_all(blocked)
    assert runs == [] and caplog.text.count("digest_failed") == 1
