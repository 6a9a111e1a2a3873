"""The tee from log events to the audit log, and `mailmoat audit ...` on its records."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.audit import AuditLog, open_audit_log
from milters.core.audit.tee import AuditTee, install_tee
from milters.core.config import load_config
from milters.core.eventlog import log_event, setup_logging
from mta.cli import main

PASSWORD = "Zq8-notice-PASSWORD-7xK"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text("store: sqlite:///state.db\n")
    return path


@pytest.fixture
def tee(config: Path) -> Iterator[AuditLog]:
    setup_logging("attachments")
    log = install_tee(load_config(config), "attachments")
    assert log is not None
    try:
        yield log
    finally:
        _remove_tee()
        log.close()


def _remove_tee() -> None:
    logger = logging.getLogger("mailmoat")
    for handler in list(logger.handlers):
        if isinstance(handler, AuditTee):
            logger.removeHandler(handler)


def test_story_events_with_a_queue_id_become_records(tee: AuditLog) -> None:
    log_event("attachments", milter="attachments", queue_id="Q1", action="encrypt",
              zip="AttachFile.20261128.zip", rcpts="b@customer.example",
              notice_to="a@example.jp", ip="192.0.2.7")
    log_event("queued", queue_id="Q1", ip="192.0.2.7", sender="a@example.jp",
              message_id="<m@example.jp>")
    log_event("connect", ip="192.0.2.7")  # not a story event
    log_event("queued", ip="192.0.2.7")  # no queue ID: nobody's story
    log_event("milter_started", milter="attachments", queue_id="Q1")  # not a story event
    tee.flush()
    story = tee.story("Q1")
    assert [r.event for r in story] == ["encrypted", "queued"]  # as the overview counts it
    first, second = story
    assert (first.actor, first.source) == ("mailmoat/attachments", "192.0.2.7")
    assert first.fields["zip"] == "AttachFile.20261128.zip"
    assert second.message_id == "<m@example.jp>" and "message_id" not in second.fields
    assert len(tee.search(limit=100)) == 2


def test_a_logged_password_reaches_neither_the_sqlite_file_nor_redis(
        tmp_path: Path, tee: AuditLog, redis_server) -> None:  # type: ignore[no-untyped-def]
    import redis
    log_event("attachments", milter="attachments", queue_id="Q1", action="encrypt",
              zip="a.zip", password=PASSWORD)  # attachments.notice.log_password: true
    tee.flush()
    [record] = tee.story("Q1")
    assert "password" not in record.fields and record.fields["zip"] == "a.zip"
    assert list(tmp_path.glob("state-audit.db*"))
    for path in tmp_path.glob("state*"):
        assert PASSWORD.encode() not in path.read_bytes()
    # The same on Redis: every key's dump searched.
    config = tmp_path / "redis.yaml"
    config.write_text(f"store: {redis_server.url}\n")
    _remove_tee()
    on_redis = install_tee(load_config(config), "attachments")
    assert on_redis is not None
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        log_event("attachments", milter="attachments", queue_id="Q2", action="encrypt",
                  zip="b.zip", password=PASSWORD)
        on_redis.flush()
        assert [r.fields for r in on_redis.story("Q2")] == [
            {"milter": "attachments", "action": "encrypt", "zip": "b.zip"}]
        keys = list(client.scan_iter(match="mailmoat.audit:*"))
        assert keys and not any(PASSWORD.encode() in (client.dump(k) or b"") for k in keys)
    finally:
        _remove_tee()
        on_redis.close()
        for key in client.scan_iter(match="mailmoat.audit:*"):
            client.delete(key)


def test_audit_enabled_false_installs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("store: sqlite:///state.db\naudit: {enabled: false}\n")
    assert install_tee(load_config(path), "serve") is None
    assert not any(isinstance(h, AuditTee) for h in logging.getLogger("mailmoat").handlers)


def test_a_bad_audit_setting_reads_like_every_config_error(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("store: sqlite:///state.db\naudit:\n  retention: forever\n")
    assert main(["audit", "verify", "--config", str(path)]) == 1
    assert re.fullmatch(rf"{re.escape(str(path))}:3:14: audit\.retention: expected a duration"
                        r".*\(got forever\)\n", capsys.readouterr().err)


def _write(config: Path) -> None:
    with open_audit_log(load_config(config)) as log:
        log.append("queued", queue_id="Q1", message_id="<m1@example.jp>", actor="mailmoat/serve",
                   source="192.0.2.7", now=1_800_000_000.0, sender="a@example.jp",
                   rcpts="Taro@example.jp", subject="line\r\nbreak\x1b[2J")
        log.append("delivered", queue_id="Q1", actor="mailmoat/delivery",
                   now=1_800_000_001.0, to="taro@example.jp")
        log.append("queued", queue_id="Q2", now=1_800_086_400.0, sender="b@example.jp")


def test_verify_prints_the_count_or_the_first_bad_record(config: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    _write(config)
    assert main(["audit", "verify", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "audit: 3 records, chain intact\n"
    import sqlite3
    with sqlite3.connect(config.parent / "state-audit.db") as db:
        db.execute("UPDATE audit SET actor = 'cli:mallory' WHERE seq = 2")
    assert main(["audit", "verify", "--config", str(config)]) == 1
    assert capsys.readouterr().out == \
        "audit: record 2: hash does not match (changed or removed)\n"


def test_show_prints_one_line_per_record_by_queue_id_or_message_id(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(config)
    assert main(["audit", "show", "Q1", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and "\x1b" not in out and "\r" not in out
    assert out.startswith("2027-01-15T08:00:00Z #1 queued queue_id=Q1 "
                          "message_id=<m1@example.jp> actor=mailmoat/serve source=192.0.2.7")
    assert main(["audit", "show", "m1@example.jp", "--config", str(config)]) == 0
    assert capsys.readouterr().out == out
    assert main(["audit", "show", "NOPE", "--config", str(config)]) == 1
    assert capsys.readouterr().out == "audit: no records for NOPE\n"


def test_search_by_address_date_and_event(config: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _write(config)

    def search(*args: str) -> list[str]:
        assert main(["audit", "search", *args, "--config", str(config)]) == 0
        return [line.split()[1] for line in capsys.readouterr().out.splitlines()]

    assert search("--address", "taro@EXAMPLE.jp") == ["#1", "#2"]
    assert search("--since", "2027-01-16") == ["#3"]
    assert search("--until", "2027-01-15") == ["#1", "#2"]  # the whole day
    assert search("--event", "delivered", "--event", "queued", "--until",
                  "2027-01-15T08:00:00") == []
    assert search("--event", "delivered") == ["#2"]
    with pytest.raises(SystemExit) as exited:
        main(["audit", "search", "--since", "yesterday", "--config", str(config)])
    assert exited.value.code == 2
    assert "is not a date" in capsys.readouterr().err


def test_reading_a_log_that_is_not_there_says_so_and_creates_nothing(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["verify"], ["show", "Q1"], ["search"], ["purge"]):
        assert main(["audit", *command, "--config", str(config)]) == 1
        assert capsys.readouterr().err == (f"mailmoat: no audit log at {config.parent}/"
                                           "state-audit.db (nothing recorded yet, or it was "
                                           "removed)\n")
    assert list(config.parent.iterdir()) == [config]


def test_memory_store_has_no_audit_log_to_read(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("store: memory://\n")
    assert main(["audit", "verify", "--config", str(path)]) == 1
    assert "memory:// keeps no audit log" in capsys.readouterr().err


def test_purge_removes_what_is_past_the_retention_and_the_rest_verifies(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time
    now = time.time()
    with open_audit_log(load_config(config)) as log:
        for age_days in (100, 95, 10, 92, 0):  # the default retention is 90 days
            log.append("queued", queue_id=f"Q{age_days}", now=now - age_days * 86400)
    assert main(["audit", "purge", "--config", str(config)]) == 0
    # The oldest records up to the first one to keep: the chain's prefix, never a hole.
    assert capsys.readouterr().out == "audit: 2 records older than the retention purged\n"
    assert main(["audit", "verify", "-v", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "audit: 3 records, chain intact"
    assert re.fullmatch(r"audit: tip: record 5 hash [0-9a-f]{64}", out[1])
    config.write_text(config.read_text() + "audit: {retention: 0}\n")
    assert main(["audit", "purge", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "audit: retention is 0 (keep forever); nothing purged\n"
