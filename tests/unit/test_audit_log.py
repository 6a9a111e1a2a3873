"""The audit log's chain on each backend: intact as written, and every way an intruder with
write access to the file changes it (a field, a removed row, two rows swapped, the newest
rows cut) is found at the first record it touches. Odd values and secrets; retention."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterator

import pytest

from milters.core.audit import AuditRecord, MemoryAuditLog, SqliteAuditLog, chain_hash
from milters.core.audit.base import FLUSH_AT, AuditLog
from milters.core.audit.record import FIELD_CAP, GENESIS

BAD = "hash does not match (changed or removed)"


def fill(log: AuditLog, count: int = 10, start: float = 1_000_000.0) -> None:
    for n in range(count):
        log.append("queued" if n % 2 == 0 else "delivered", queue_id=f"Q{n // 2}",
                   actor="mailmoat/serve", source="192.0.2.7", now=start + n,
                   sender="a@example.jp", to=f"user{n}@example.jp")
    log.flush()


@pytest.fixture(params=["sqlite", "memory"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditLog]:
    made: AuditLog = (SqliteAuditLog(str(tmp_path / "state.db")) if request.param == "sqlite"
                      else MemoryAuditLog())
    yield made
    made.close()


def sql(tmp_path: Path, statement: str, *args: object) -> None:
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute(statement, args)


def test_a_fresh_chain_is_intact_and_linked_from_genesis(log: AuditLog) -> None:
    assert log.verify().ok and log.verify().checked == 0
    fill(log)
    result = log.verify()
    assert (result.ok, result.checked, result.tip_seq) == (True, 10, 10)
    records = sorted(log.search(limit=100), key=lambda r: r.seq)
    assert [r.seq for r in records] == list(range(1, 11))
    assert records[0].prev_hash == GENESIS
    for before, after in zip(records, records[1:]):
        assert after.prev_hash == before.hash
    # The hash is sha256(prev + canonical JSON): sorted keys, no whitespace, UTF-8.
    body = json.dumps(records[3].body(), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    import hashlib
    assert records[3].hash == hashlib.sha256(
        (records[3].prev_hash + body).encode()).hexdigest()


def test_nothing_is_written_before_flush_or_a_full_batch(tmp_path: Path) -> None:
    log = SqliteAuditLog(str(tmp_path / "state.db"))
    other = SqliteAuditLog(str(tmp_path / "state.db"))  # another process's view
    try:
        log.append("queued", queue_id="Q1")
        assert other.verify().checked == 0  # buffered: no transaction per event
        log.flush()
        assert other.verify().checked == 1
    finally:
        log.close()
        other.close()


@pytest.mark.parametrize("change, first_bad", [
    ("UPDATE audit SET fields = replace(fields, 'user4@', 'evil@') WHERE seq = 5", 5),
    ("UPDATE audit SET source = '198.51.100.1' WHERE seq = 3", 3),
    ("UPDATE audit SET time = time - 3600 WHERE seq = 7", 7),
    ("UPDATE audit SET event = 'released' WHERE seq = 10", 10),
    ("DELETE FROM audit WHERE seq = 4", 4),
    ("DELETE FROM audit WHERE seq = 1", 1),
    # Two rows swapped: each keeps its seq, the contents trade places.
    ("UPDATE audit SET fields = CASE seq WHEN 6 THEN (SELECT fields FROM audit WHERE seq = 8)"
     " ELSE (SELECT fields FROM audit WHERE seq = 6) END WHERE seq IN (6, 8)", 6),
    # The newest records cut: the tip says 10, the rows end at 8.
    ("DELETE FROM audit WHERE seq > 8", 9),
    # ... and the tip set back to hide it, one record too few.
    ("UPDATE audit_mark SET seq = 9 WHERE name = 'tip'", 10),
    # A record's hash recomputed by the intruder: the next record no longer links to it.
    ("UPDATE audit SET fields = '{}' WHERE seq = 2", 2),
])
def test_tampering_in_the_sqlite_file_names_the_first_bad_record(
        tmp_path: Path, change: str, first_bad: int) -> None:
    with SqliteAuditLog(str(tmp_path / "state.db")) as log:
        fill(log)
        assert log.verify().ok
    sql(tmp_path, change)
    with SqliteAuditLog(str(tmp_path / "state.db")) as log:
        result = log.verify()
    assert (result.ok, result.first_bad_seq, result.reason) == (False, first_bad, BAD)


def test_a_rehashed_record_still_breaks_the_link_to_the_next(tmp_path: Path) -> None:
    with SqliteAuditLog(str(tmp_path / "state.db")) as log:
        fill(log)
        record = next(r for r in log.search(limit=100) if r.seq == 4)
    forged = {**record.fields, "to": "someone-else@example.jp"}
    body = {**record.body(), "fields": forged}
    sql(tmp_path, "UPDATE audit SET fields = ?, hash = ? WHERE seq = 4",
        json.dumps(forged), chain_hash(record.prev_hash, body))
    with SqliteAuditLog(str(tmp_path / "state.db")) as log:
        assert log.verify().first_bad_seq == 5


def test_tampering_in_memory_is_found_too() -> None:
    log = MemoryAuditLog()
    fill(log)
    from dataclasses import replace
    log.rows[2] = replace(log.rows[2], actor="console:mallory")
    assert log.verify().first_bad_seq == 3
    log.rows[1], log.rows[2] = log.rows[2], log.rows[1]
    assert log.verify().first_bad_seq == 2


def test_odd_values_are_kept_verifiable_and_capped(log: AuditLog) -> None:
    odd = "line one\r\nline two\0nul \x1b[31m 8-bit: \xe9\xff 日本語 \udcff"
    log.append("queued", queue_id="Q\r\nX", message_id="<a\0b\xe9日本@example.jp>", note=odd,
               actor="console:山田\udcff", source="\u2028",
               raw=b"\xff\xfe bytes", huge="x" * 1_000_000, nested={"a": [1, 2.5, None, odd]},
               number=2**80, nan=float("nan"), **{"bad\nkey": 1})
    log.flush()
    assert log.verify().ok
    [record] = log.story("Q\r\nX")
    assert record.fields["note"].startswith("line one\r\nline two\0nul")
    assert "\\udcff" in record.fields["note"]  # a lone surrogate, escaped
    assert record.fields["raw"] == "\\xff\\xfe bytes"
    assert len(record.fields["huge"]) < FIELD_CAP + 100
    assert record.fields["huge"].endswith("more characters cut]")
    assert record.fields["number"] == str(2**80) and record.fields["nan"] == "nan"
    assert record.message_id == "<a\0b\xe9日本@example.jp>"
    assert record.actor == "console:山田\\udcff"


def test_fields_named_like_secrets_are_never_recorded(log: AuditLog) -> None:
    log.append("attachments", queue_id="Q1", password="Hunter2-Secret", zip="a.zip",
               api_key="K-123-SECRET", nested={"token": "T-SECRET", "ok": "fine"},
               Client_Secret="S-SECRET")
    log.flush()
    [record] = log.story("Q1")
    assert record.fields == {"zip": "a.zip", "nested": {"ok": "fine"}}
    assert "SECRET" not in record.to_json() and "Hunter2" not in record.to_json()


def test_retention_purges_a_prefix_and_the_chain_stays_verifiable(log: AuditLog) -> None:
    fill(log, 10, start=1000.0)  # times 1000 .. 1009
    assert log.purge(before=1004.0) == 4
    result = log.verify()
    assert (result.ok, result.checked, result.tip_seq) == (True, 6, 10)
    assert log.purge(before=1004.0) == 0  # nothing older left
    fill(log, 2, start=2000.0)  # appended after the purge: still one chain
    assert log.verify().ok and log.verify().checked == 8
    assert log.purge(before=10**10) == 8
    assert log.verify().ok and log.verify().checked == 0
    fill(log, 1, start=3000.0)
    assert log.verify().ok and sorted(r.seq for r in log.search(limit=10)) == [13]


def test_a_purged_anchor_cannot_be_moved_unnoticed(tmp_path: Path) -> None:
    with SqliteAuditLog(str(tmp_path / "state.db")) as log:
        fill(log, 10, start=1000.0)
        log.purge(before=1003.0)
    # The intruder removes more old records and moves the anchor past them.
    sql(tmp_path, "DELETE FROM audit WHERE seq <= 5")
    sql(tmp_path, "UPDATE audit_mark SET seq = 5 WHERE name = 'anchor'")
    with SqliteAuditLog(str(tmp_path / "state.db")) as log:
        assert log.verify().first_bad_seq == 6  # record 6's prev_hash is not the anchor's


def test_search_story_and_counts(log: AuditLog) -> None:
    fill(log, 10, start=7200.0)  # 2h: 5 queued, 5 delivered in the hour from 7200
    log.append("released", queue_id="Q9", actor="console:alice", source="192.0.2.9",
               now=7200.0 + 3600, rcpts="Taro@Example.JP,b@example.jp")
    log.flush()
    assert [r.event for r in log.story("Q1")] == ["queued", "delivered"]
    assert [r.seq for r in log.search(address="<taro@example.jp>")] == [11]
    assert [r.seq for r in log.search(address="user3@example.jp")] == [4]
    assert log.search(address="example.jp") == []  # a whole address, not a piece
    assert [r.seq for r in log.search(text="ALICE")] == [11]
    assert [r.seq for r in log.search(events=["queued"], limit=2)] == [9, 7]
    assert [r.seq for r in log.search(since=7205.0, until=7207.0)] == [7, 6]
    assert log.counts(since=0, until=10**6, step=3600) == {
        (7200.0, "queued"): 5, (7200.0, "delivered"): 5, (10800.0, "released"): 1}
    with pytest.raises(ValueError):
        log.counts(since=0, until=1, step=0)


def test_a_full_batch_is_written_without_waiting_for_the_timer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from milters.core.audit import base
    monkeypatch.setattr(base, "FLUSH_EVERY", 60.0)  # the timer would come too late
    log = SqliteAuditLog(str(tmp_path / "state.db"))
    reader = SqliteAuditLog(str(tmp_path / "state.db"))
    try:
        for n in range(FLUSH_AT):
            log.append("queued", queue_id=f"Q{n}")
        deadline = time.monotonic() + 5
        while reader.verify().checked < FLUSH_AT:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        log.close()
        reader.close()


def test_records_survive_a_store_error_and_are_written_later(tmp_path: Path) -> None:
    from milters.core.errors import StoreUnavailable
    path = tmp_path / "state.db"
    path.mkdir()  # not a database: every write fails, as with a full or missing disk
    log = SqliteAuditLog(str(path))
    log.append("queued", queue_id="Q1")
    with pytest.raises(StoreUnavailable):
        log.flush()
    path.rmdir()
    log.append("delivered", queue_id="Q1")
    log.flush()
    assert [r.event for r in log.story("Q1")] == ["queued", "delivered"]
    assert log.verify().ok
    log.close()


def test_a_record_round_trips_through_json() -> None:
    log = MemoryAuditLog()
    log.append("queued", queue_id="Q1", note="日本語\r\n", now=1.5)
    log.flush()
    [record] = log.rows
    again = AuditRecord.from_json(record.to_json())
    assert again == record and again.expected_hash() == record.hash


def test_search_and_counts_over_more_records_than_one_read(log: AuditLog) -> None:
    for n in range(2500):  # sqlite reads 1000 at a time
        log.append("queued" if n % 3 else "delivered", queue_id=f"Q{n % 7}",
                   now=3600.0 * (n // 1000) + n % 1000, to=f"u{n}@example.jp")
    log.flush()
    assert [r.seq for r in log.search(limit=10**6)] == list(range(2500, 0, -1))
    assert log.search(address="u0@example.jp")[0].seq == 1
    assert [r.seq for r in log.story("Q3")] == list(range(4, 2501, 7))
    assert log.counts(since=0, until=10**6, step=3600) == {
        (0.0, "queued"): 666, (0.0, "delivered"): 334, (3600.0, "queued"): 667,
        (3600.0, "delivered"): 333, (7200.0, "queued"): 333, (7200.0, "delivered"): 167}
    assert log.verify().checked == 2500


def test_a_new_file_locked_while_another_process_sets_it_up_is_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateway processes start together and open the log at once: the one switching the
    new file to WAL locks even the others' first schema read, and SQLite's busy handler
    does not wait for that (seen as `database is locked` in the full suite). The set-up is
    retried within the timeout, as the Store's is; past it, StoreUnavailable."""
    from milters.core.audit import sqlite_log
    from milters.core.errors import StoreUnavailable

    real_connect = sqlite3.connect
    locked_for = {"tries": 3}

    class Busy(sqlite3.Connection):
        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
            if sql.startswith("PRAGMA journal_mode") and locked_for["tries"] > 0:
                locked_for["tries"] -= 1
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *args)

    monkeypatch.setattr(sqlite_log.sqlite3, "connect",
                        lambda *a, **k: real_connect(*a, **k, factory=Busy))
    log = sqlite_log.SqliteAuditLog(str(tmp_path / "audit.db"), timeout=5)
    log.append("queued", queue_id="Q1")
    log.flush()
    assert locked_for["tries"] == 0 and log.verify().ok
    log.close()

    locked_for["tries"] = 10**9  # never free: a clear error once the timeout is over
    stuck = sqlite_log.SqliteAuditLog(str(tmp_path / "other.db"), timeout=0.2)
    with pytest.raises(StoreUnavailable, match="database is locked"):
        stuck.append("queued", queue_id="Q2")
        stuck.flush()
