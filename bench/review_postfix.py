"""Outbound review behind Postfix: how fast `mailmoat postfix-review` releases approved mail,
next to Postfix's own release by hand, in one run on one Postfix.

    .venv/bin/python bench/review_postfix.py [--quick]

Both sides release N messages that the review milter holds in Postfix's hold queue, through
the same release port (the recipe's milter_header_checks FILTER to an smtpd running the
attachments milter: ZIP and password notice), to the same sink:

  - by hand (the peer): `postsuper -H -` with the N queue IDs on its standard input, then
    `postqueue -f`: what an admin types, one command for all;
  - the runner: the N reviews approved in the review book at once (as N clicks on approve
    links would), then `mailmoat postfix-review` does `postsuper -H` and `postqueue -i` per
    message in its next round.

Timed from the release (or the decisions) until the sink holds the N zipped messages. Also
the cost of one runner round while N messages wait on hold (postqueue -j, the book's pending
and due lists), measured in this process. Needs root (a private Postfix). Loopback only;
every wait is bounded; everything started is stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from _common import (ROOT, BenchError, machine_line, postfix_version,  # noqa: E402
                     run_bench, world_readable_tmpdir)

from milters.core.review import SqliteReviewBook  # noqa: E402
from tests.harness.milter_proc import MilterProcess  # noqa: E402
from tests.harness.ports import free_port  # noqa: E402
from tests.harness.review_world import review_behind_postfix  # noqa: E402
from tests.harness.postfix import postfix_instance  # noqa: E402
from tests.harness.sink import SmtpSink  # noqa: E402

SENDER, OUTSIDE, BOSS = "hanako@example.jp", "buyer@customer.example", "boss@example.jp"
POLICY = """\
internal_networks: [127.0.0.0/8]
own_domains: [example.jp]
rules:
  - name: approval
    when: {direction: outbound, outside_recipients: true, attachments: true}
    then: {review: {approve: {approvers: [boss@example.jp], timeout: 1h}}}
  - name: outside-recipients-get-a-zip
    when: {direction: outbound, recipient: ["*", "!@example.jp"]}
    then: {attachments: encrypt}
"""
WAIT = 300.0  # seconds any one phase may take before the run gives up


def message(number: int) -> bytes:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = SENDER, OUTSIDE, f"quotation {number}"
    mail["Message-ID"] = f"<bench-{number}-{time.time_ns()}@example.jp>"
    mail.set_content("The quotation is attached.\n")
    mail.add_attachment(b"%PDF-1.4 quotation\n" * 500, maintype="application",
                        subtype="pdf", filename=f"quotation-{number}.pdf")
    return bytes(mail)


def send(port: int, first: int, count: int) -> None:
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for number in range(first, first + count):
            client.sendmail(SENDER, [OUTSIDE], message(number))


def wait_until(what: str, check, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"gave up waiting for {what} after {timeout:.0f}s")
        time.sleep(0.02)


def held_ids(postfix) -> list[str]:  # type: ignore[no-untyped-def]
    return [m["queue_id"] for m in postfix.queue() if m["queue_name"] == "hold"]


def outside(sink: SmtpSink) -> int:
    return sum(1 for m in sink.messages if OUTSIDE in m.rcpt_tos)


def preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root: it starts a private Postfix")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 messages a side, not 200")
    args = parser.parse_args(argv)
    count = 50 if args.quick else 200

    def body() -> int:
        with world_readable_tmpdir("mailmoat-bench-review-") as work:
            run(work, count)
        return 0
    return run_bench("review_postfix.py", " --quick" if args.quick else "", preflight,
                     lambda: machine_line(f"Postfix {postfix_version()}"), body)


def run(work: Path, count: int) -> None:
    reinject, release = free_port(), free_port()
    (work / "policy.yaml").write_text(POLICY)
    config = work / "config.yaml"
    config.write_text(f"gateway: {{hostname: mx.example.jp, user: root, "
                      f"reinject_listen: 127.0.0.1:{reinject}}}\n"
                      "store: sqlite:///state.db\npolicy: policy.yaml\n"
                      "review: {console_url: \"http://127.0.0.1:8026\", "
                      "token_key_file: var/review-key}\n")
    milters = [MilterProcess(name, config, work).start() for name in ("review", "attachments")]
    runner: subprocess.Popen[bytes] | None = None
    try:
        with SmtpSink() as sink, postfix_instance(
                work, relay_port=sink.port,
                smtpd_milters=" ".join(m.socket_spec for m in milters),
                reinject_port=reinject, relay_domains="example.jp, customer.example",
                **review_behind_postfix(release, milters[1].socket_spec, "300s")) as postfix:
            # -- the peer: Postfix's own release, by hand ------------------------------------
            send(postfix.smtp_port, 0, count)
            wait_until(f"{count} held", lambda: len(held_ids(postfix)) >= count)
            ids = held_ids(postfix)
            config_dir = str(postfix.config_dir)
            started = time.monotonic()
            subprocess.run(["postsuper", "-c", config_dir, "-H", "-"], check=True,
                           input="\n".join(ids).encode(), capture_output=True, timeout=WAIT)
            subprocess.run(["postqueue", "-c", config_dir, "-f"], check=True,
                           capture_output=True, timeout=WAIT)
            wait_until(f"{count} released by hand", lambda: outside(sink) >= count)
            by_hand = time.monotonic() - started

            # -- one runner round while N wait on hold ---------------------------------------
            send(postfix.smtp_port, count, count)
            wait_until(f"{count} held again", lambda: len(held_ids(postfix)) >= count)
            from mta.review.postfix_queue import PostfixQueue
            from mta.review.postfix_runner import postfix_review_runner
            from milters.core.config import load_config
            probe = postfix_review_runner(load_config(config), PostfixQueue(config_dir))
            rounds = []
            for _ in range(5):
                t0 = time.perf_counter()
                asyncio.run(probe.round())
                rounds.append(time.perf_counter() - t0)

            # -- the runner: N approvals at once ---------------------------------------------
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            with open(work / "postfix-review.log", "wb") as log:
                runner = subprocess.Popen(
                    [sys.executable, "-m", "mta.cli", "postfix-review", "--config", str(config),
                     "--postfix-config", config_dir], cwd=work, stdout=log, stderr=log,
                    env=env)
            held = set(held_ids(postfix))
            book = SqliteReviewBook(str(work / "state-review.db"))
            waiting = [r for r in book.pending(limit=10 * count) if r.queue_id in held]
            before = outside(sink)
            started = time.monotonic()
            for record in waiting:
                book.decide(record.id, BOSS, "127.0.0.1", "approve")
            wait_until(f"{count} released by the runner",
                       lambda: outside(sink) >= before + len(waiting))
            by_runner = time.monotonic() - started
            book.close()
    finally:
        if runner is not None:
            runner.terminate()
            runner.wait(30)
        for milter in milters:
            milter.stop()

    print(f"\n{count} messages a side, each zipped by the attachments milter on release\n")
    print("| release | seconds | messages/s |")
    print("|---|---|---|")
    print(f"| by hand: postsuper -H - (all IDs) + postqueue -f | {by_hand:.2f} | "
          f"{count / by_hand:.1f} |")
    print(f"| postfix-review: {len(waiting)} approvals in the book | {by_runner:.2f} | "
          f"{len(waiting) / by_runner:.1f} |")
    print(f"\nratio runner/by hand (time): {by_runner / by_hand:.2f}x")
    print(f"one runner round with {count} on hold: median "
          f"{statistics.median(rounds) * 1000:.0f} ms (of 5)")


if __name__ == "__main__":
    sys.exit(main())
