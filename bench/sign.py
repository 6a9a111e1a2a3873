"""Messages per second through Postfix with mailmoat's sign milter against Postfix with
OpenDKIM in signing mode, same message, same RSA-2048 key, same run; and, in process, our
canonicalization and OpenSSL signing against dkimpy's.

    .venv/bin/python bench/sign.py [--quick]

One key made by `mailmoat dkim keygen` (rsa 2048) signs for example.jp on both sides:
relaxed/relaxed, rsa-sha256, From, Subject, Date, To, Cc, Reply-To, Message-ID and the MIME
fields over-signed on both. smtp-source sends one ~1 KB message (-F) through three private
Postfix instances relaying to one smtp-sink: (a) no milter, (c) OpenDKIM (Mode s),
(d) `mailmoat milter sign`, both milters on unix sockets. Variants alternate over rounds,
at concurrency 1 and 20; the table shows medians and the ratio (d)/(c) (target >= 1.0).
Before timing, one message per variant goes to a second sink, where dkimpy must verify the
signature (d= example.jp, the published key).

Everything listens on loopback only; every loop is bounded; every process started here is
stopped before exit. Exit status 0 unless something could not run or a check failed
(missed targets are reported, not failures).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import SMTP_SINK, SMTP_SOURCE, smtp_sink, LogCounter, cpu_seconds  # noqa: E402
from _common import smtp_source as run_smtp_source  # noqa: E402
from _common import (ROOT, machine_line, postfix_version, BenchError, run_bench, fmt_rate,
                     median, table, verdict, wait_until, world_readable_tmpdir)

import dkim  # noqa: E402
from dkim.canonicalization import Relaxed  # noqa: E402

from milters.sign.dkim_sign import (BodyHasher, SigningKey, dkim_signature,  # noqa: E402
                                    sign_bytes)
from milters.core.dkim_keys import load_private_key  # noqa: E402
from milters.sign.settings import DEFAULT_HEADERS  # noqa: E402
from tests.harness.milter_proc import MilterProcess  # noqa: E402
from tests.harness.opendmarc import OpenDkimVerifier  # noqa: E402
from tests.harness.ports import LOOPBACK  # noqa: E402
from tests.harness.postfix import PostfixInstance  # noqa: E402
from tests.harness.sink import SmtpSink  # noqa: E402

DOMAIN, SELECTOR = "example.jp", "r1"
SENDER, RECIPIENT, CHECK_RECIPIENT = f"hanako@{DOMAIN}", "to@customer.example", "check@customer.example"
OVERSIGN = ("from", "subject", "date", "to", "cc", "reply-to", "message-id", "mime-version",
            "content-type", "content-transfer-encoding")
RATIO_TARGET = 1.0
MAILLOG_BAD = re.compile(r"milter-reject|NOQUEUE: reject|status=(deferred|bounced)"
                         r"|warning: milter|fatal:|panic:")


@dataclass(frozen=True)
class Settings:
    messages: int
    rounds: int
    budget: float
    concurrencies: tuple[int, ...] = (1, 20)

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        return cls(300, 4, 60.0) if quick else cls(600, 9, 240.0)


class OpenDkimSigner(OpenDkimVerifier):
    """Debian's OpenDKIM in signing mode with one key, the same over-signed fields."""

    def __init__(self, workdir: Path, unix_path: Path, key: Path) -> None:
        super().__init__("127.0.0.1", workdir, unix_path=unix_path)
        self.key = key

    def config_lines(self) -> dict[str, str]:
        return {"Socket": self.milter_socket, "PidFile": str(self.workdir / "opendkim.pid"),
                "Mode": "s", "Domain": DOMAIN, "Selector": SELECTOR, "KeyFile": str(self.key),
                "Canonicalization": "relaxed/relaxed", "SignatureAlgorithm": "rsa-sha256",
                # OpenDKIM signs an over-signed field only as absent unless SignHeaders
                # lists it too (it then fails to verify): the same list as ours on both
                "SignHeaders": ",".join(DEFAULT_HEADERS),
                "OversignHeaders": ",".join(OVERSIGN), "InternalHosts": "127.0.0.1",
                # the bench lives under /tmp, which OpenDKIM refuses to trust key paths in
                "RequireSafeKeys": "false", "Syslog": "no"}


def message_text() -> bytes:
    body = "".join(f"Line {i:02d} of the quarterly figures: revenue, costs and the outlook"
                   f" for the next quarter.\r\n" for i in range(1, 14))
    return (f"From: Hanako <{SENDER}>\r\nTo: {RECIPIENT}\r\nSubject: Quarterly report\r\n"
            f"Date: Sun, 6 Dec 2026 10:00:00 +0900\r\nMessage-ID: <q.1@{DOMAIN}>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"{body}").encode()


# == in process: canonicalization and RSA, ours against dkimpy's ============================
def per_call(call, seconds: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    """Microseconds per call, best of three runs of about `seconds`/3 each."""
    best = float("inf")
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            call()
            count += 1
        best = min(best, (time.perf_counter() - start) / count)
    return best * 1e6


def in_process(key_file: Path) -> list[list[str]]:
    algorithm, private = load_private_key(key_file)
    key = SigningKey(DOMAIN, SELECTOR, algorithm, private)
    pem = key_file.read_bytes()
    raw = message_text()
    head, body = raw.split(b"\r\n\r\n", 1)
    fields = [(line.split(b":", 1)[0], line.split(b":", 1)[1]) for line in head.split(b"\r\n")]
    big = body * (1024 * 1024 // len(body))

    def ours(data: bytes) -> bytes:
        hasher = BodyHasher("relaxed")
        for start in range(0, len(data), 65536):  # as milter body chunks come
            hasher.feed(data[start:start + 65536])
        return hasher.digest()

    def theirs(data: bytes) -> bytes:
        return hashlib.sha256(Relaxed.canonicalize_body(data)).digest()

    assert ours(big) == theirs(big) and ours(body) == theirs(body)
    parsed = dkim.crypto.parse_pem_private_key(pem)
    rows = []
    for what, a, b in (
            ("relaxed body hash, 1 KB", lambda: ours(body), lambda: theirs(body)),
            ("relaxed body hash, 1 MB", lambda: ours(big), lambda: theirs(big)),
            ("RSA-2048 signature", lambda: sign_bytes(key, b"x"),
             lambda: dkim.crypto.RSASSA_PKCS1_v1_5_sign(hashlib.sha256(b"x"), parsed)),
            ("whole DKIM-Signature, 1 KB message",
             lambda: dkim_signature(key, fields, ours(body), signed_headers=[
                 n.decode().lower() for n, _ in fields], oversign=OVERSIGN, timestamp=1),
             lambda: dkim.sign(raw, SELECTOR.encode(), DOMAIN.encode(), pem,
                               include_headers=[n.lower() for n, _ in fields]))):
        mine, dkimpy = per_call(a), per_call(b)
        rows.append([what, f"{mine:,.1f}", f"{dkimpy:,.1f}", f"{dkimpy / mine:.1f}x"])
    return rows


# == through Postfix =========================================================================
@dataclass
class Variant:
    key: str
    label: str
    milters: str = ""
    pid: int = 0
    postfix: PostfixInstance | None = None
    sent: int = 0
    times: dict[int, list[float]] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)
    timed: dict[int, int] = field(default_factory=dict)


def send(v: Variant, count: int, concurrency: int, message: Path,
         recipient: str = RECIPIENT) -> float:
    assert v.postfix is not None
    counter = LogCounter(v.postfix, MAILLOG_BAD)
    wall = run_smtp_source(v.postfix.smtp_port, count, concurrency, SENDER, recipient, message,
                           f"client.{DOMAIN}")
    v.sent += count
    wait_until(lambda: counter.sent() >= count, 60 + count / 10,
               f"{count} deliveries by Postfix ({v.label})", interval=0.05)
    if counter.problems():
        raise BenchError(f"{v.label}: " + "\n".join(counter.problems()[:10]))
    return wall


def check_signed(variants: list[Variant], check_sink: SmtpSink, message: Path,
                 record: bytes) -> list[str]:
    seen = []
    for v in variants:
        before = len(check_sink.messages)
        send(v, 1, 1, message, CHECK_RECIPIENT)
        got = check_sink.wait_for(before + 1, timeout=30)[before].data
        signed = b"DKIM-Signature:" in got
        if v.key == "a":
            continue
        ok = signed and dkim.verify(got, dnsfunc=lambda name, timeout=5: record)
        if not ok:
            raise BenchError(f"{v.label}: no signature dkimpy verifies:\n{got[:1500]!r}")
        sig = re.sub(rb"\s+", b" ", got.split(b"DKIM-Signature:", 1)[1].split(b"b=", 1)[0])
        seen.append(f"({v.key}) dkimpy: pass; {sig.decode()[:200]}")
    return seen


def run(settings: Settings, tmp: Path) -> tuple[list[Variant], list[str], int]:
    done = subprocess.run([sys.executable, "-m", "mta.cli", "dkim", "keygen", "--domain",
                           DOMAIN, "--selector", SELECTOR, "--bits", "2048"], cwd=tmp,
                          capture_output=True, text=True, env={**os.environ,
                                                              "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise BenchError(f"keygen: {done.stderr}")
    key = tmp / f"{DOMAIN}.{SELECTOR}.key"
    record = "".join(re.findall(r'"([^"]*)"', done.stdout)).encode()
    message = tmp / "message.eml"
    message.write_bytes(message_text().replace(b"\r\n", b"\n"))  # smtp-source -F adds CRs
    sockets = tmp / "sockets"
    sockets.mkdir()
    os.chmod(sockets, 0o755)
    (tmp / "sign").mkdir()
    (tmp / "sign" / "policy.yaml").write_text(
        f"internal_networks: [127.0.0.0/8]\nsign:\n  keys:\n    - {{domain: {DOMAIN}, "
        f"selector: {SELECTOR}, file: \"{key}\"}}\n  oversign: [{', '.join(OVERSIGN)}]\n")
    config = tmp / "sign" / "config.yaml"
    config.write_text("store: memory://\npolicy: policy.yaml\n")
    variants = [Variant("a", "Postfix, no milter"),
                Variant("c", "+ OpenDKIM (Mode s)", f"unix:{sockets / 'opendkim.sock'}"),
                Variant("d", "+ mailmoat sign milter", f"unix:{sockets / 'sign.sock'}")]
    with contextlib.ExitStack() as stack:
        opendkim = stack.enter_context(OpenDkimSigner(tmp, sockets / "opendkim.sock", key))
        ours = stack.enter_context(MilterProcess("sign", config, tmp / "sign",
                                                 unix_path=sockets / "sign.sock"))
        assert ours.proc is not None
        variants[1].pid, variants[2].pid = opendkim.pid, ours.proc.pid
        sink_port = stack.enter_context(smtp_sink(tmp / "smtp-sink.log"))
        check_sink = stack.enter_context(SmtpSink())
        for v in variants:
            v.postfix = stack.enter_context(PostfixInstance(
                relay_port=sink_port, smtpd_milters=v.milters, base_dir=tmp / f"pf-{v.key}",
                relay_domains="customer.example", extra={
                    "smtp_connection_cache_on_demand": "yes",
                    "local_header_rewrite_clients": "",
                    "transport_maps": f"inline:{{{CHECK_RECIPIENT}=smtp:[{LOOPBACK}]:"
                                      f"{check_sink.port}}}"}))
        for v in variants:
            send(v, 20, 5, message)  # warm-up
        seen = check_signed(variants, check_sink, message, record)
        started, rounds = time.monotonic(), 0
        for rnd in range(settings.rounds):
            if time.monotonic() - started > settings.budget:
                break
            for c in settings.concurrencies:
                shift = rnd % len(variants)
                for v in variants[shift:] + variants[:shift]:
                    before = cpu_seconds(v.pid) if v.pid else 0.0
                    v.times.setdefault(c, []).append(send(v, settings.messages, c, message))
                    if v.pid:
                        v.cpu[c] = v.cpu.get(c, 0.0) + cpu_seconds(v.pid) - before
                    v.timed[c] = v.timed.get(c, 0) + settings.messages
            rounds += 1
        logged = len(re.findall(r"event=signed ", ours.log_text()))
        seen.append(f"sign milter log: {logged} event=signed lines for {variants[2].sent} "
                    "messages through (d)")
        if logged != variants[2].sent:
            raise BenchError(seen[-1])
    return variants, seen, rounds


def print_result(settings: Settings, variants: list[Variant], seen: list[str], rounds: int,
                 micro: list[list[str]]) -> None:
    n = settings.messages
    by = {v.key: v for v in variants}
    print("In process (microseconds per call, best of 3; ours: BodyHasher fed 64 KB chunks,"
          " OpenSSL through cryptography; dkimpy 1.1.8: Relaxed.canonicalize_body + sha256,"
          " its pure-Python RSA, dkim.sign)")
    print(table(["operation", "ours us", "dkimpy us", "dkimpy/ours"], micro))
    print(f"\nMessages/s until every message is accepted (smtp-source -F, ~1 KB message, -m {n};"
          f" median of {rounds} rounds, variants alternated; ratio: median of per-round ratios)")
    headers = ["variant"]
    for c in settings.concurrencies:
        headers += [f"c={c} msgs/s", f"c={c} milter CPU ms/msg"]
    rows = []
    for v in variants:
        row = [f"({v.key}) {v.label}"]
        for c in settings.concurrencies:
            row += [fmt_rate(n / median(v.times[c])),
                    f"{v.cpu[c] / v.timed[c] * 1e3:.2f}" if v.pid else ""]
        rows.append(row)
    row = [f"ratio (d)/(c), target >= {RATIO_TARGET:.1f}"]
    for c in settings.concurrencies:
        ratio = median([tc / td for td, tc in zip(by["d"].times[c], by["c"].times[c])])
        cpu = (by["d"].cpu[c] / by["d"].timed[c]) / (by["c"].cpu[c] / by["c"].timed[c])
        row += [f"{ratio:.3f} {verdict(ratio >= RATIO_TARGET)}", f"{cpu:.2f}x"]
    rows.append(row)
    print(table(headers, rows))
    for line in seen:
        print(f"  {line}")


def preflight() -> None:
    missing = [p for p in (SMTP_SOURCE, SMTP_SINK, "/usr/sbin/postfix", "/usr/sbin/opendkim")
               if not os.access(p, os.X_OK)]
    if missing:
        raise BenchError("missing: " + ", ".join(missing))
    if os.geteuid() != 0:
        raise BenchError("needs root: private Postfix instances")


def describe_machine() -> str:
    out = subprocess.run(["/usr/sbin/opendkim", "-V"], capture_output=True, text=True)
    version = (out.stdout or out.stderr).split()[3] if (out.stdout or out.stderr) else "?"
    return machine_line(f"Postfix {postfix_version()}", f"OpenDKIM {version}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 messages per run, 4 rounds")
    args = parser.parse_args(argv)
    settings = Settings.make(args.quick)

    def body() -> int:
        with world_readable_tmpdir("mailmoat-bench-sign-") as tmp:
            variants, seen, rounds = run(settings, tmp)
            print_result(settings, variants, seen, rounds,
                         in_process(tmp / f"{DOMAIN}.{SELECTOR}.key"))
        return 0
    return run_bench("sign.py", " --quick" if args.quick else "", preflight, describe_machine,
                     body)


if __name__ == "__main__":
    sys.exit(main())
