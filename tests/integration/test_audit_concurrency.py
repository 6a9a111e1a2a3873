"""Several processes append to one audit log at once (the smtpd, delivery, each milter; or
several gateways on one Redis): the records form ONE linear chain, none lost, none twice.
Each writer is a process of its own, opening the log from a gateway config as the
gateway's processes do, and flushing small batches so that the batches interleave."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from milters.core.audit import open_audit_log
from milters.core.config import load_config
from tests.harness.bounded import wait_until
from tests.harness.milter_proc import ROOT
from tests.harness.redis_server import RedisServer

pytestmark = pytest.mark.integration

WRITERS, BATCHES, PER_BATCH = 4, 150, 4

WRITER = """
import os, sys, time
from milters.core.audit import open_audit_log
from milters.core.config import load_config
config, name, go = sys.argv[1:4]
log = open_audit_log(load_config(config))
open(go + "-ready-" + name, "w").close()  # opened its log: waiting for the others
deadline = time.monotonic() + 60
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.001)
for batch in range({batches}):
    for n in range({per_batch}):
        log.append("queued", queue_id=f"{{name}}-{{batch}}-{{n}}", actor=name)
    log.flush()
log.close()
""".format(batches=BATCHES, per_batch=PER_BATCH)


def run_writers(config: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(config), f"w{i}", str(go)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stderr=subprocess.PIPE, text=True) for i in range(WRITERS)]
    # All of them started, their logs open, before any writes: on a loaded machine starting
    # Python takes seconds, and a late writer would find the others done (no interleaving).
    def all_ready() -> bool:
        assert all(proc.poll() is None for proc in procs), [p.stderr.read() for p in procs
                                                            if p.poll() is not None]
        return all((tmp_path / f"go-ready-w{i}").exists() for i in range(WRITERS))
    wait_until(all_ready, 60, "the writers never got ready", poll=0.01)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err


def check_one_chain(config: Path) -> None:
    with open_audit_log(load_config(config)) as log:
        result = log.verify()
        records = sorted(log.search(limit=10**6), key=lambda r: r.seq)
    total = WRITERS * BATCHES * PER_BATCH
    assert (result.ok, result.checked) == (True, total), result
    assert [r.seq for r in records] == list(range(1, total + 1))
    assert len({r.queue_id for r in records}) == total  # none twice, none lost
    writers_in_order = [r.actor for r in records]
    # The batches really interleaved (else this proves nothing about concurrency).
    switches = sum(a != b for a, b in zip(writers_in_order, writers_in_order[1:]))
    assert switches >= 2 * WRITERS, switches


def test_processes_appending_to_one_sqlite_file_keep_one_chain(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("store: sqlite:///state.db\n")
    run_writers(config, tmp_path)
    check_one_chain(config)


def test_gateways_appending_to_one_redis_keep_one_chain(tmp_path: Path,
                                                        redis_server: RedisServer) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store: {redis_server.url}\n")
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    _forget_audit(client)  # the server is shared by the run: only our keys
    try:
        run_writers(config, tmp_path)
        check_one_chain(config)
    finally:
        _forget_audit(client)


def _forget_audit(client: redis.Redis) -> None:
    for key in client.scan_iter(match="mailmoat.audit:*"):
        client.delete(key)


def _race(module: object, first: object, second: object) -> None:
    """`first` flushes and, between reading the tip and writing after it, waits while
    `second` flushes a record of its own: the moment where two writers could fork."""
    import threading

    original = module.seal_batch  # type: ignore[attr-defined]
    second_done = threading.Event()
    calls = []

    def slow_seal(batch, tip):  # type: ignore[no-untyped-def]
        calls.append(tip)
        if len(calls) == 1:  # the first writer, tip read: let the other one in now
            threading.Thread(target=lambda: (second.flush(), second_done.set())).start()
            second_done.wait(1.0)  # it must wait for us (lock or WATCH); bounded either way
        return original(batch, tip)

    module.seal_batch = slow_seal  # type: ignore[attr-defined]
    try:
        first.append("queued", queue_id="FIRST")  # type: ignore[attr-defined]
        second.append("queued", queue_id="SECOND")  # type: ignore[attr-defined]
        first.flush()  # type: ignore[attr-defined]
        assert second_done.wait(15)
    finally:
        module.seal_batch = original  # type: ignore[attr-defined]


def test_a_writer_between_tip_and_write_waits_its_turn_on_sqlite(tmp_path: Path) -> None:
    from milters.core.audit import SqliteAuditLog, sqlite_log
    first = SqliteAuditLog(str(tmp_path / "audit.db"))
    second = SqliteAuditLog(str(tmp_path / "audit.db"))
    try:
        _race(sqlite_log, first, second)
        result = first.verify()
        assert (result.ok, result.checked) == (True, 2), result
        assert {r.queue_id for r in first.search(limit=10)} == {"FIRST", "SECOND"}
    finally:
        first.close()
        second.close()


def test_a_writer_between_tip_and_write_retries_on_redis(tmp_path: Path,
                                                        redis_server: RedisServer) -> None:
    from milters.core.audit import redis_log
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store: {redis_server.url}\n")
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    _forget_audit(client)
    first, second = (open_audit_log(load_config(config)) for _ in range(2))
    try:
        _race(redis_log, first, second)
        result = first.verify()
        assert (result.ok, result.checked) == (True, 2), result
        assert {r.queue_id for r in first.search(limit=10)} == {"FIRST", "SECOND"}
    finally:
        first.close()
        second.close()
        _forget_audit(client)
