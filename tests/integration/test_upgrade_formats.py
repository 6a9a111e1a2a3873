"""Upgrades: a spool and a state database written in the previous format (before formats
were kept: no `format` file, SQLite user_version 0; written here byte for byte as that code
wrote them) are marked on start, their mail delivered once, their rate-limit counters kept.
A spool, SQLite file or Redis marked by a newer mailmoat makes serve refuse to start with a
clear error, touching nothing."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.milter_proc import ROOT
from tests.harness.redis_server import RedisServer
from tests.integration.test_serve import Serve, outside

pytestmark = pytest.mark.integration

LIMITED_IP = "192.0.2.44"
BUCKET = f"rl:ip:[{LIMITED_IP}]:bucket:per-ip"  # the per-ip limit of test_serve.POLICY


def _envelope(queue_id: str, rcpts: list[tuple[str, str]], attempts: int = 0) -> dict:
    """The envelope as the previous Envelope.to_dict() wrote it."""
    return {"queue_id": queue_id, "sender": "old@outside.example",
            "recipients": [{"address": a, "params": None, "status": s, "last_reply": None}
                           for a, s in rcpts],
            "received_at": time.time() - 600, "client_ip": "192.0.2.9", "helo": "old.example",
            "attempts": attempts, "next_attempt": 0.0, "hold_reason": None, "size": 0,
            "extra": {}}


def write_old_spool(spool: Path) -> dict[str, bytes]:
    """Two queued messages: one never tried, one tried before with one recipient done (its
    envelope rewritten to ID.env, as a delivery attempt left it)."""
    (spool / "tmp").mkdir(parents=True)
    (spool / "active").mkdir()
    messages = {}
    for queue_id, rcpts, rewritten in (
            ("00000000000001AAAAAA", [("taro@example.jp", "pending")], False),
            ("00000000000002BBBBBB", [("hanako@example.jp", "delivered"),
                                      ("jiro@example.jp", "pending")], True)):
        body = (f"From: old@outside.example\r\nSubject: queued by the old spool {queue_id}"
                f"\r\n\r\nhello\r\n").encode()
        env = _envelope(queue_id, [(a, "pending") for a, _ in rcpts])
        env["size"] = len(body)
        data = json.dumps(env).encode()
        (spool / "active" / f"{queue_id}.msg").write_bytes(
            body + data + b"\n" + b"MMENV1" + b"%09d\n" % len(data))
        if rewritten:
            later = _envelope(queue_id, rcpts, attempts=1)
            later["size"] = len(body)
            (spool / "active" / f"{queue_id}.env").write_bytes(json.dumps(later).encode())
        messages[queue_id] = body
    return messages


def write_old_state(path: Path, *, user_version: int = 0) -> float:
    """The state file as the previous SqliteStore made it, with a full bucket for LIMITED_IP;
    returns the bucket's stored level."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value REAL NOT NULL,"
               " updated REAL NOT NULL, expires REAL) WITHOUT ROWID")
    db.execute("CREATE INDEX IF NOT EXISTS state_expires ON state(expires)")
    now = time.time()
    db.execute("INSERT INTO state VALUES (?, ?, ?, ?)", (BUCKET, 1.0, now, now + 86400))
    if user_version:
        db.execute(f"PRAGMA user_version = {user_version}")
    db.close()
    return 1.0


def test_a_spool_and_a_state_of_the_previous_format_are_upgraded_on_start(tmp_path: Path
                                                                          ) -> None:
    spool = tmp_path / "var" / "spool"
    messages = write_old_spool(spool)
    level = write_old_state(tmp_path / "state.db")
    serve = Serve(tmp_path).start()
    try:
        for queue_id in messages:
            serve.wait_log(rf"event=delivered queue_id={queue_id} ")
        maildir = tmp_path / "maildir"
        got = {who: [p.read_bytes() for p in (maildir / who / "new").iterdir()]
               for who in ("taro@example.jp", "jiro@example.jp")}
        # Once each, whole (after the Return-Path and Delivered-To that Maildir adds).
        [taro], [jiro] = got["taro@example.jp"], got["jiro@example.jp"]
        assert taro.endswith(b"\r\n" + messages["00000000000001AAAAAA"])
        assert jiro.endswith(b"\r\n" + messages["00000000000002BBBBBB"])
        assert not (maildir / "hanako@example.jp").exists()  # done before the upgrade
        assert (spool / "format").read_text() == "1\n"
        db = sqlite3.connect(tmp_path / "state.db")
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        [(value,)] = db.execute("SELECT value FROM state WHERE key = ?", (BUCKET,)).fetchall()
        db.close()
        assert value == level
        # The kept counter still limits: the full bucket tempfails its IP, not another.
        assert outside(serve.port, client=LIMITED_IP).reply_by_stage["MAIL"].startswith(
            "451 4.7.1 Slow down from serve")
        assert outside(serve.port, client="192.0.2.99").code("DATA_END") == 250
    finally:
        serve.stop()


def _refused(serve: Serve) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "mta.cli", "serve", "--config",
                           str(serve.config)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "event=serve_started" not in done.stderr
    return done


def test_a_spool_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    spool = tmp_path / "var" / "spool"
    messages = write_old_spool(spool)
    (spool / "format").write_text("2\n")
    before = sorted(p.name for p in (spool / "active").iterdir())
    done = _refused(Serve(tmp_path))
    assert done.stderr.strip().splitlines()[-1] == (
        f"mailmoat: spool {spool}: format 2 is newer than this mailmoat knows (up to 1): it "
        "was written by a newer mailmoat; run that version to deliver what is queued, or "
        "give this one another queue.dir")
    assert sorted(p.name for p in (spool / "active").iterdir()) == before
    assert (spool / "format").read_text() == "2\n" and messages


@pytest.mark.parametrize("text", ["two\n", ""])
def test_a_garbled_spool_format_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    spool = tmp_path / "var" / "spool"
    write_old_spool(spool)
    (spool / "format").write_text(text)
    done = _refused(Serve(tmp_path))
    assert f"mailmoat: spool {spool}: format holds {text!r}, not a format number" in done.stderr


def test_a_state_database_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    write_old_state(tmp_path / "state.db", user_version=2)
    done = _refused(Serve(tmp_path))
    assert done.stderr.strip().splitlines()[-1] == (
        f"mailmoat: sqlite {tmp_path / 'state.db'}: state format 2 is newer than this "
        "mailmoat knows (up to 1): it was written by a newer mailmoat; run that version, or "
        "give this one a state store of its own")
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2  # untouched
    db.close()


def test_a_redis_marked_by_a_newer_mailmoat_is_refused_and_an_unmarked_one_marked(
        tmp_path: Path) -> None:
    import redis

    with RedisServer() as server:
        serve = Serve(tmp_path)
        serve.config.write_text(serve.config.read_text().replace(
            "store: sqlite:///state.db", f"store: {server.url}"))
        client = redis.Redis(host=server.host, port=server.port)
        client.hset("mailmoat:" + BUCKET, mapping={"v": 1, "u": time.time()})
        serve.start()
        serve.stop()
        assert client.get("mailmoat.format") == b"1"  # marked beside the old records
        assert client.hget("mailmoat:" + BUCKET, "v") == b"1"
        client.set("mailmoat.format", 2)
        done = _refused(serve)
        assert done.stderr.strip().splitlines()[-1].startswith(
            f"mailmoat: redis {server.host}:{server.port}: state format 2 is newer than this "
            "mailmoat knows (up to 1)")
