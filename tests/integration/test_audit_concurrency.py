"""Several processes append to one audit log at once (the smtpd, delivery, each milter; or
several gateways on one Redis): the records form ONE linear chain, none lost, none twice.
Each writer is a process of its own, opening the log from a gateway config as the
gateway's processes do, and flushing small batches so that the batches interleave."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from milters.core.audit import open_audit_log
from milters.core.config import load_config
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
deadline = time.monotonic() + 30
while not os.path.exists(go):
    assert time.monotonic() < deadline
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
    time.sleep(0.3)  # all of them started and waiting (they poll for `go`)
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
