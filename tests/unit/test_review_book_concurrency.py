"""Deciders in separate processes (the console, the timer, a second gateway) race on the
same reviews in one SQLite file: each review gets exactly one decision. The Redis twin of
this test is in tests/integration/test_review_book_redis.py (it reuses `race`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from milters.core.config import load_config
from milters.core.review import new_review, open_review_book
from tests.harness.milter_proc import ROOT

T0 = 1_700_000_000.0
DECIDERS, REVIEWS = 4, 40

DECIDER = """
import json, os, sys, time
from milters.core.config import load_config
from milters.core.errors import ReviewRefused
from milters.core.review import open_review_book
config, n, go, ids = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
book = open_review_book(load_config(config))
who, action = [("taro@example.jp", "cancel"), ("boss@example.jp", "approve"),
               ("boss@example.jp", "reject")][n % 3]
deadline = time.monotonic() + 30
while not os.path.exists(go):
    assert time.monotonic() < deadline
    time.sleep(0.001)
won, lost = [], []
for review_id in ids:
    try:
        book.decide(review_id, who, f"p{n}", action, now=@NOW@, token_id=f"k{n}")
        won.append(review_id)
    except ReviewRefused as exc:
        lost.append(exc.reason)
book.close()
print(json.dumps({"won": won, "lost": lost}))
""".replace("@NOW@", repr(T0 + 1))


def race(config: Path, tmp_path: Path) -> None:
    """REVIEWS approvals, DECIDERS processes deciding each at once: exactly one wins each,
    and the book holds that winner's decision only."""
    book = open_review_book(load_config(config))
    ids = [book.create(new_review(queue_id=f"Q{i}", kind="approve", sender="taro@example.jp",
                                  recipients=["x@partner.example"], subject="s", now=T0,
                                  timeout=3600, approvers=["boss@example.jp"])).id
           for i in range(REVIEWS)]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", DECIDER, str(config), str(n), str(go),
                               ",".join(ids)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
             for n in range(DECIDERS)]
    time.sleep(0.3)  # all started and polling for `go`
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    won = [review_id for result in results for review_id in result["won"]]
    assert sorted(won) == sorted(ids)  # every review won once, none twice
    assert all(reason == "decided" for result in results for reason in result["lost"])
    for n, result in enumerate(results):
        for review_id in result["won"]:
            [decision] = book.get(review_id).decisions
            assert decision.source == f"p{n}"
    book.close()


def test_processes_deciding_in_one_sqlite_file_each_review_once(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("store: sqlite:///state.db\n")
    race(config, tmp_path)
