"""How fast and how lean `mailmoat serve` is next to Postfix, on the same machine in the same run.

    .venv/bin/python bench/mta.py [--quick] [--profile]

Part 1: messages per second accepted by `smtp-source -> mailmoat serve -> smtp-sink` and by
`smtp-source -> Postfix -> smtp-sink`, at concurrency 1 and 20, first with no milter, then
with the ratelimit milter in both (serve's own child; Postfix via smtpd_milters on a unix
socket). Both queues are durable: Postfix fsyncs its queue file, serve fsyncs before its 250.
Variants alternate over rounds; the table shows medians and the ratio mailmoat/Postfix.
Part 2: peak RSS (VmHWM) of serve, its delivery process and its milter child while one
25 MiB message goes through a fresh serve, against the message size. --profile: where serve's time goes
(py-spy) and syscalls per message on both sides (strace).

Everything listens on 127.0.0.1 only; every loop is bounded in count and time; every process
and directory started here is stopped or removed before exit, also on SIGTERM or Ctrl-C.
Exit status 0 unless something could not run or a check failed (missed targets are reported,
not failures). See bench/README.md for what each number means.
"""
from __future__ import annotations

import sys

import argparse
import base64
import contextlib
import os
import re
import signal
import smtplib
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import SMTP_SINK, SMTP_SOURCE, smtp_sink, cpu_seconds, ratelimit_show  # noqa: E402
from _common import smtp_source as run_smtp_source  # noqa: E402
from _common import (ROOT, gateway_yaml, machine_line, postfix_version, BenchError, child_process, run_bench,
                     fmt_rate, median, table, verdict, wait_until, world_readable_tmpdir)

from tests.harness.milter_proc import MilterProcess  # noqa: E402  (after _common's sys.path)
from tests.harness.ports import LOOPBACK, free_port, is_listening  # noqa: E402
from tests.harness.postfix import PostfixInstance  # noqa: E402

SENDER = "from@outside.example"
RECIPIENT = "to@example.jp"
BIG_SIZE = 25 * 1024 * 1024  # the 25 MB message of DESIGN.md section 10
RATE_TARGET = 1.0  # mailmoat msgs/s divided by Postfix msgs/s
RSS_TARGET = 3.0  # peak RSS of each process, in message sizes

# Three limits with bursts no run can fill, so nothing is refused and every message takes
# the milter's full path through its SQLite store. Loopback is not exempt: every client here
# is 127.0.0.1. sender-messages drains 100/hour, so its level counts the messages decided.
POLICY = """\
policy_version: 1
ratelimit:
  exempt_internal: false
  limits:
    - {name: client-messages, key: client_ip, per: message, rate: 30/min, burst: 1000000}
    - {name: client-recipients, key: client_ip, per: recipient, rate: 200/hour, burst: 1000000}
    - {name: sender-messages, key: sender, per: message, rate: 100/hour, burst: 1000000}
"""


# serve's log lines that mean a message was refused, lost its way or hit an error.
SERVE_BAD = re.compile(r"event=(reject|milter_verdict|milter_failed|milter_process_died|"
                       r"spool_error|deferred|bounced|expired)\b|Traceback")
MAILLOG_BAD = re.compile(r"milter-reject|NOQUEUE: reject|status=(deferred|bounced)|"
                         r"warning: milter|fatal:|panic:")


@dataclass(frozen=True)
class Settings:
    quick: bool
    messages: int  # smtp-source -m per timed run
    rounds: int
    budget: float  # seconds: no new round starts after this, whatever `rounds` says
    concurrencies: tuple[int, ...] = (1, 20)

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if quick:
            return cls(quick, messages=100, rounds=2, budget=120.0)
        return cls(quick, messages=400, rounds=5, budget=900.0)


# == processes ===============================================================================
def status_kb(pid: int, name: str) -> int:
    """A 'kB' line of /proc/PID/status, e.g. VmHWM (peak RSS) or VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {name} in /proc/{pid}/status")


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


class Sink:
    """One smtp-sink per variant, so each side's deliveries are counted on their own."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = 0

    @contextlib.contextmanager
    def running(self) -> Iterator["Sink"]:
        with smtp_sink(self.log, user="postfix") as port:
            self.port = port
            yield self

    def count(self) -> int:
        """smtp-sink -c rewrites 'sess=N quit=N mesg=N' with CRs; the last one is the total."""
        found = re.findall(r"mesg=(\d+)", self.log.read_text(errors="replace"))
        return int(found[-1]) if found else 0


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    log: Path
    milter_pid: int = 0
    delivery_pid: int = 0  # `mailmoat deliver`, serve's delivery process

    def children(self) -> list[int]:
        return [pid for pid in (self.milter_pid, self.delivery_pid) if pid]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def write_mailmoat_config(workdir: Path, ports: tuple[int, int, int], sink_port: int,
                          with_milter: bool) -> Path:
    """serve's config plus the policy, side by side; relative paths stay inside `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "policy.yaml").write_text(POLICY)
    config = workdir / "config.yaml"
    config.write_text(gateway_yaml(ports, sink_port) + f"""\
milters: {"[{name: ratelimit}]" if with_milter else "[]"}
store: sqlite:///state.db
policy: policy.yaml
""")
    return config


def free_ports(count: int) -> list[int]:
    """Distinct free ports: the kernel may hand a just-released port out again."""
    ports: list[int] = []
    for _ in range(count * 10):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise BenchError(f"could not find {count} distinct free ports")


@contextlib.contextmanager
def mailmoat_serve(workdir: Path, sink_port: int, with_milter: bool) -> Iterator[Serve]:
    """`mailmoat serve --config ...` as an admin runs it, for the duration of the block."""
    # Each serve gets its own metrics port too: the default (9781) would clash between them.
    port, reinject, metrics = free_ports(3)
    config = write_mailmoat_config(workdir, (port, reinject, metrics), sink_port, with_milter)
    log = workdir / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "mta.cli", "serve", "--config", str(config)]
    with child_process(argv, log=log, env=env, cwd=ROOT) as proc:
        # /proc/net/tcp, not a probe connection: a probe would be an SMTP (and milter) session.
        # serve_started comes after every listener is up; a failed bind ends the process.
        wait_until(lambda: proc.poll() is not None or (
            is_listening(LOOPBACK, port) and "event=serve_started" in log.read_text(
                errors="replace")), 30, f"mailmoat serve on port {port}")
        if proc.poll() is not None:
            raise BenchError(f"mailmoat serve exited {proc.returncode}:"
                             f" {log.read_text(errors='replace')}")
        serve = Serve(proc, port, config, log)
        found = re.search(r"event=delivery_process_started pid=(\d+)", serve.log_text())
        if not found:
            raise BenchError(f"serve did not log its delivery process:\n{serve.log_text()}")
        serve.delivery_pid = int(found.group(1))
        if with_milter:
            found = re.search(r"event=milter_process_started milter=ratelimit pid=(\d+)",
                              serve.log_text())
            if not found:
                raise BenchError(f"serve did not log its milter's pid:\n{serve.log_text()}")
            serve.milter_pid = int(found.group(1))
        yield serve


def postfix_cpu(pf: PostfixInstance) -> float:
    """All of this instance's CPU so far: live daemons plus those master already reaped."""
    total = 0.0
    master = pf.master_pid()
    for pid in pf.pids():
        with contextlib.suppress(OSError, IndexError, ValueError):  # exited meanwhile
            total += cpu_seconds(pid, reaped_children=pid == master)
    return total


# == Part 1: messages per second ============================================================
@dataclass
class Variant:
    key: str  # "mm", "pf", "mm+rl", "pf+rl"
    label: str
    sink: Sink
    port: int = 0
    serve: Serve | None = None
    postfix: PostfixInstance | None = None
    milter: MilterProcess | None = None  # Postfix's ratelimit milter
    sent: int = 0
    times: dict[int, list[float]] = field(default_factory=dict)  # acceptance wall times
    drains: list[float] = field(default_factory=list)  # last 250 -> sink has everything
    cpu: dict[int, float] = field(default_factory=dict)  # seconds over the timed runs
    timed: dict[int, int] = field(default_factory=dict)  # messages in the timed runs

    def cpu_now(self) -> float:
        """CPU of everything on this side except smtp-source and smtp-sink."""
        if self.serve is not None:
            return sum(cpu_seconds(pid) for pid in [self.serve.proc.pid]
                       + self.serve.children())
        assert self.postfix is not None
        total = postfix_cpu(self.postfix)
        if self.milter is not None and self.milter.proc is not None:
            total += cpu_seconds(self.milter.proc.pid)
        return total


def smtp_source(port: int, count: int, concurrency: int) -> float:
    return run_smtp_source(port, count, concurrency, SENDER, RECIPIENT)

def wait_delivered(v: Variant, timeout: float) -> float:
    """Wait until the sink has every message sent to this side; returns when that was
    (perf_counter), before also waiting for serve to log the last delivery."""
    try:
        wait_until(lambda: v.sink.count() >= v.sent, timeout,
                   f"{v.sent} messages at {v.label}'s sink (has {v.sink.count()})", interval=0.02)
        done = time.perf_counter()
        if v.serve is not None:
            # The sink counts at its 250; serve logs the delivery only after reading it.
            serve = v.serve
            wait_until(lambda: serve.log_text().count("event=delivered ") >= v.sent, 10,
                       f"serve to log {v.sent} deliveries")
        return done
    except BenchError as exc:
        tail = v.serve.log_text() if v.serve else (v.postfix.log_text() if v.postfix else "")
        raise BenchError(f"{exc}; log tail:\n{tail[-3000:]}") from None


def timed_run(v: Variant, count: int, concurrency: int) -> float:
    """One run: the time until every message was accepted; then wait until the sink has
    them all, so that runs never overlap and the CPU figure covers delivery too."""
    before = v.cpu_now()
    wall = smtp_source(v.port, count, concurrency)
    accepted = time.perf_counter()
    v.sent += count
    v.drains.append(wait_delivered(v, 60 + count / 10) - accepted)
    v.cpu[concurrency] = v.cpu.get(concurrency, 0.0) + v.cpu_now() - before
    v.timed[concurrency] = v.timed.get(concurrency, 0) + count
    return wall


def make_variants(tmp: Path) -> list[Variant]:
    return [
        Variant("mm", "mailmoat serve, no milter", Sink(tmp / "sink-mm.log")),
        Variant("pf", "Postfix, no milter", Sink(tmp / "sink-pf.log")),
        Variant("mm+rl", "mailmoat serve + ratelimit milter", Sink(tmp / "sink-mm-rl.log")),
        Variant("pf+rl", "Postfix + ratelimit milter", Sink(tmp / "sink-pf-rl.log")),
    ]


def start_variants(stack: contextlib.ExitStack, variants: list[Variant], tmp: Path) -> None:
    sockets = tmp / "sockets"
    sockets.mkdir()
    os.chmod(sockets, 0o755)  # smtpd runs as user postfix and must reach the milter socket
    for v in variants:
        stack.enter_context(v.sink.running())
        with_milter = v.key.endswith("+rl")
        if v.key.startswith("mm"):
            v.serve = stack.enter_context(mailmoat_serve(tmp / v.key, v.sink.port, with_milter))
            v.port = v.serve.port
            continue
        milter_spec = ""
        if with_milter:
            workdir = tmp / "pf-milter"
            # Only its store and policy matter to the milter; the ports are never bound.
            config = write_mailmoat_config(workdir, (0, 0, 0), v.sink.port, True)
            v.milter = stack.enter_context(MilterProcess(
                "ratelimit", config, workdir, unix_path=sockets / "ratelimit.sock"))
            milter_spec = v.milter.socket_spec
        # Postfix at its defaults otherwise (connection cache on demand included): the
        # reference is Postfix as shipped, durable queue and all.
        v.postfix = stack.enter_context(PostfixInstance(
            relay_port=v.sink.port, smtpd_milters=milter_spec, base_dir=tmp / f"pf-{v.key}",
            extra={"smtp_connection_cache_on_demand": "yes"}))
        v.port = v.postfix.smtp_port


@dataclass
class Part1Result:
    variants: list[Variant]
    rounds_done: int
    problems: list[str]
    stores: dict[str, str]  # variant key -> `mailmoat ratelimit show` output


def log_problems(v: Variant) -> list[str]:
    if v.serve is not None:
        lines = [f"{v.label}: {line}" for line in v.serve.log_text().splitlines()
                 if SERVE_BAD.search(line)]
        queued = v.serve.log_text().count("event=queued ")
        delivered = v.serve.log_text().count("event=delivered ")
        if queued != v.sent or delivered != v.sent:
            lines.append(f"{v.label}: {v.sent} sent, serve logged {queued} queued and"
                         f" {delivered} delivered")
        return lines
    assert v.postfix is not None
    lines = [f"{v.label}: {line}" for line in v.postfix.log_text().splitlines()
             if MAILLOG_BAD.search(line)]
    if v.milter is not None:
        lines += [f"{v.label} milter: {line}" for line in v.milter.log_text().splitlines()
                  if re.search(r"event=(milter_error|store_unavailable|verdict)|Traceback",
                               line)]
    return lines


def part1(settings: Settings, tmp: Path, stack: contextlib.ExitStack) -> Part1Result:
    variants = make_variants(tmp)
    start_variants(stack, variants, tmp)
    for v in variants:  # warm up: daemons forked, milter and SQLite file ready, code paged in
        try:
            smtp_source(v.port, 20, 5)
        except BenchError as exc:
            raise BenchError(f"{v.label}: {exc}") from None
        v.sent += 20
        wait_delivered(v, 60)
    started = time.monotonic()
    rounds_done = 0
    for rnd in range(settings.rounds):
        if time.monotonic() - started > settings.budget:
            break
        for concurrency in settings.concurrencies:
            # Rotate the order each round so no variant always runs first or last.
            shift = rnd % len(variants)
            for v in variants[shift:] + variants[:shift]:
                v.times.setdefault(concurrency, []).append(
                    timed_run(v, settings.messages, concurrency))
        rounds_done += 1
    problems = [line for v in variants for line in log_problems(v)]
    for v in variants:
        if v.sink.count() != v.sent:
            problems.append(f"{v.label}: sent {v.sent}, its sink counted {v.sink.count()}")
    stores = {}
    for v in variants:
        if v.serve is not None and v.serve.milter_pid:
            stores[v.key] = ratelimit_show(v.serve.config)
        elif v.milter is not None and v.milter.config is not None:
            stores[v.key] = ratelimit_show(v.milter.config)
    return Part1Result(variants, rounds_done, problems, stores)


def print_part1(settings: Settings, result: Part1Result) -> bool:
    n = settings.messages
    by_key = {v.key: v for v in result.variants}
    print(f"Part 1: messages/s until every message is accepted (smtp-source -m {n} -l 1000,"
          f" one session per message; median of {result.rounds_done} rounds, variants"
          f" alternated; ratios are the median of per-round ratios)")
    headers = ["variant"]
    for c in settings.concurrencies:
        headers += [f"c={c} msgs/s", f"c={c} min..max", f"c={c} CPU ms/msg"]
    body = []
    for chain, (mm, pf) in (("no milter", ("mm", "pf")), ("ratelimit milter", ("mm+rl", "pf+rl"))):
        for key in (mm, pf):
            v = by_key[key]
            row = [v.label]
            for c in settings.concurrencies:
                times = v.times[c]
                row += [fmt_rate(n / median(times)),
                        f"{fmt_rate(n / max(times))}..{fmt_rate(n / min(times))}",
                        f"{v.cpu[c] / v.timed[c] * 1e3:.2f}"]
            body.append(row)
        row = [f"ratio mailmoat/Postfix, {chain} (target >= {RATE_TARGET:.2f})"]
        for c in settings.concurrencies:
            # Paired within each round (seconds apart, under the same load from other tenants).
            pairs = [t_pf / t_mm for t_mm, t_pf in zip(by_key[mm].times[c], by_key[pf].times[c])]
            ratio = median(pairs)
            cpu_ratio = ((by_key[mm].cpu[c] / by_key[mm].timed[c])
                         / (by_key[pf].cpu[c] / by_key[pf].timed[c]))
            row += [f"{ratio:.3f} {verdict(ratio >= RATE_TARGET)}",
                    f"{min(pairs):.2f}..{max(pairs):.2f}", f"{cpu_ratio:.2f}x"]
        body.append(row)
    print(table(headers, body))
    print("  CPU ms/msg: user+system CPU of everything on that side but smtp-source and"
          " smtp-sink (serve, its delivery process and its milter child; Postfix's daemons,"
          " reaped ones included,"
          " and its milter), from the first connection until the sink had every message;"
          " in ratio rows mailmoat's CPU per message over Postfix's (lower is better)")
    print("  last 250 -> sink has all, median: "
          + ", ".join(f"{v.label} {median(v.drains):.2f} s" for v in result.variants))
    ok = True
    sent = ", ".join(f"{v.key} {v.sent}" for v in result.variants)
    print(f"  checks: every sink counted every message sent to its side ({sent}); serve logged"
          f" each queued and delivered; no refusal, deferral or milter error in any log")
    for key, text in result.stores.items():
        v = by_key[key]
        match = re.search(rf"sender {re.escape(SENDER)}\s+sender-messages\s+([\d.]+) of", text)
        if not match:
            ok = False
            print(f"  FAILED: no sender-messages record for {v.label}:\n{text}")
            continue
        level = float(match.group(1))
        # 100/hour drains about 0.03 per second: the level is the messages decided, minus that.
        good = v.sent - 60 <= level <= v.sent
        ok &= good
        print(f"  {v.label}: its store's sender-messages bucket is at {level:.1f} for {v.sent}"
              f" messages{'' if good else ' -- FAILED: the milter did not decide every one'}")
    for problem in result.problems[:20]:
        print(f"  FAILED: {problem}")
    if result.rounds_done < settings.rounds:
        print(f"  note: time budget of {settings.budget:.0f} s reached after"
              f" {result.rounds_done} of {settings.rounds} rounds")
    return ok and not result.problems  # a missed target is reported above, not a failure


# == Part 2: memory for one 25 MB message ====================================================
def big_message(size: int) -> bytes:
    """A MIME message of exactly `size` bytes: base64 lines of 76 characters, CRLF ends."""
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: 25 MB benchmark message\r\n"
            f"Message-ID: <big.{os.getpid()}@bench.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode()
    body_len = size - len(head)
    payload = base64.encodebytes(os.urandom(body_len // 78 * 57 + 57)).replace(b"\n", b"\r\n")
    # Cut to size without leaving a bare CR; the last line may end up a few characters long.
    body = payload[:body_len - 2].rstrip(b"\r\n")
    return head + body + b"A" * (body_len - 2 - len(body)) + b"\r\n"


def send_big(port: int, raw: bytes) -> tuple[float, str]:
    """One SMTP session with the whole message; (seconds until the DATA reply, that reply)."""
    start = time.perf_counter()
    with smtplib.SMTP(LOOPBACK, port, local_hostname="bench.client", timeout=300) as client:
        client.ehlo()
        code, reply = client.mail(SENDER, [f"SIZE={len(raw)}"])
        if code != 250:
            raise BenchError(f"MAIL FROM refused: {code} {reply!r}")
        code, reply = client.rcpt(RECIPIENT)
        if code != 250:
            raise BenchError(f"RCPT TO refused: {code} {reply!r}")
        code, reply = client.data(raw)
        elapsed = time.perf_counter() - start
        if code != 250:
            raise BenchError(f"DATA refused: {code} {reply!r}")
    return elapsed, reply.decode(errors="replace")


@dataclass
class Part2Result:
    size: int
    idle: dict[str, int]  # process -> VmHWM (kB) after start-up, before the message
    after_accept: dict[str, int]
    after_delivery: dict[str, int]
    mm_accept: float
    mm_delivered: float
    pf_accept: float | None
    pf_peaks: list[tuple[str, int]]  # (daemon name, VmHWM kB), largest first


def part2(tmp: Path, postfix_side: Variant | None) -> Part2Result:
    raw = big_message(BIG_SIZE)
    assert len(raw) == BIG_SIZE, len(raw)
    sink = Sink(tmp / "sink-memory.log")
    with sink.running(), mailmoat_serve(tmp / "memory", sink.port, True) as serve:
        pids = {"serve": serve.proc.pid, "delivery process": serve.delivery_pid,
                "ratelimit milter": serve.milter_pid}

        def peaks() -> dict[str, int]:
            return {name: status_kb(pid, "VmHWM") for name, pid in pids.items()}

        idle = peaks()
        accept, reply = send_big(serve.port, raw)
        after_accept = peaks()
        start = time.perf_counter()
        # The sink counts at its 250; serve logs the delivery only after reading that reply.
        wait_until(lambda: sink.count() >= 1 and "event=delivered " in serve.log_text(), 120,
                   "the 25 MB message at the sink")
        delivered = time.perf_counter() - start + accept
        after_delivery = peaks()
        problems = [line for line in serve.log_text().splitlines() if SERVE_BAD.search(line)]
        if problems or "event=delivered " not in serve.log_text():
            raise BenchError("the 25 MB message did not go through cleanly:\n"
                             + "\n".join(problems or serve.log_text().splitlines()[-10:]))
        del reply
    pf_accept = None
    pf_peaks: list[tuple[str, int]] = []
    if postfix_side is not None and postfix_side.postfix is not None:
        # The same message through Postfix with the same milter: accept time, and the peak
        # RSS of its daemons (long-lived, so VmHWM still covers this message).
        pf_accept, _ = send_big(postfix_side.port, raw)
        postfix_side.sent += 1
        wait_delivered(postfix_side, 120)
        by_daemon: dict[str, int] = {}
        for pid in postfix_side.postfix.pids():
            with contextlib.suppress(OSError, BenchError):
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                by_daemon[name] = max(by_daemon.get(name, 0), status_kb(pid, "VmHWM"))
        pf_peaks = sorted(by_daemon.items(), key=lambda item: -item[1])
    return Part2Result(BIG_SIZE, idle, after_accept, after_delivery, accept, delivered,
                       pf_accept, pf_peaks)


def print_part2(result: Part2Result) -> None:
    size_kb = result.size / 1024
    print(f"Part 2: peak RSS (VmHWM) while one {result.size / 2**20:.0f} MiB message"
          f" ({result.size:,} bytes) goes through a fresh `serve` with the ratelimit milter"
          f" (target: each process <= {RSS_TARGET:g}x the message)")
    headers = ["process", "after start-up", "after the 250", "after delivery",
               "peak / message", "result", "growth / message"]
    body = []
    for name in result.idle:
        # VmHWM may include a transient the kernel had not folded in yet: take the highest.
        peak = max(result.after_accept[name], result.after_delivery[name])
        body.append([name, mb(result.idle[name]), mb(result.after_accept[name]),
                     mb(result.after_delivery[name]),
                     f"{peak / size_kb:.2f}x", verdict(peak / size_kb <= RSS_TARGET),
                     f"{(peak - result.idle[name]) / size_kb:.2f}x"])
    print(table(headers, body))
    print(f"  mailmoat: 250 after {result.mm_accept:.2f} s (smtplib, one session), at the sink"
          f" after {result.mm_delivered:.2f} s")
    if result.pf_accept is not None:
        top = ", ".join(f"{name} {mb(kb)}" for name, kb in result.pf_peaks[:4])
        print(f"  Postfix + ratelimit milter, same message: 250 after {result.pf_accept:.2f} s"
              f" (mailmoat took {result.mm_accept / result.pf_accept:.1f}x as long); peak RSS"
              f" of its largest daemons: {top}")


# == --profile: where serve's time goes ======================================================
PY_SPY = Path(sys.executable).parent / "py-spy"
STRACE = "/usr/bin/strace"
# Categories for py-spy's stacks, first match wins. py-spy runs with --gil: it samples only
# the thread holding the GIL, i.e. serve's Python CPU, which is what caps its rate (one
# process, so at most one core of Python). Leaf frames that only wait are told apart.
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("idle: event loop in epoll", re.compile(r"^\S*select \(\S*selectors\.py")),
    ("idle: executor thread waiting", re.compile(r"^_worker \(\S*concurrent/futures/thread")),
]
STACK_CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("enqueue (spool file with envelope trailer, fsyncs, rename, dir fsync)",
     re.compile(r"^(Incoming\.\w+|Queue\.receive) ")),
    ("milter chain (client, protocol steps)", re.compile(r"mta/milter_(chain|client)\.py")),
    ("connection set-up and tear-down", re.compile(
        r"^(\S*_accept_connection\S* |\S*connection_(made|lost) )")),
    ("DATA stream (end of data, checks, dot-unstuffing)", re.compile(r"^DataStream\.")),
    ("SMTP replies (transport.write)", re.compile(r"^_SelectorSocketTransport\.write ")),
    ("log lines (log_event)", re.compile(r"^log_event ")),
    ("executor hand-offs (run_in_executor and back)", re.compile(
        r"^(\S*run_in_executor|\S*call_soon_threadsafe|\S*_write_to_self|_chain_future\S*"
        r"|ThreadPoolExecutor\.\S+|_WorkItem\.run) ")),
    ("rest of the SMTP receive path", re.compile(r"mta/smtp(d|_syntax|_data)\.py")),
]


def categorize(raw_stacks: str) -> tuple[Counter[str], Counter[str], int]:
    """py-spy `-f raw` lines ('thread;frame;...;frame COUNT', outermost first) ->
    (samples per category, samples per innermost busy frame, total samples)."""
    categories: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw_stacks.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r"\(/\S*?/(site-packages|python3\.\d+|main)/", "(", frame)
                  for frame in stack.split(";")[1:]]  # [0] names the thread
        total += count
        leaf = frames[-1] if frames else "?"
        name = next((n for n, pattern in CATEGORIES if pattern.search(leaf)), None)
        if name is None:
            name = next((n for n, pattern in STACK_CATEGORIES
                         if any(pattern.search(frame) for frame in frames)), "other")
            leaves[leaf] += count
        categories[name] += count
    return categories, leaves, total


def py_spy_run(v: Variant, count: int, concurrency: int, out: Path) -> float:
    """One run like the timed ones, with py-spy sampling serve's GIL holder throughout."""
    assert v.serve is not None
    spy = subprocess.Popen([str(PY_SPY), "record", "-p", str(v.serve.proc.pid), "-f", "raw",
                            "-o", str(out), "--threads", "--gil", "--nonblocking", "-r", "1000",
                            "-d", str(int(60 + count / 10))],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)  # py-spy attaches
        wall = timed_run(v, count, concurrency)
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            spy.wait(20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
    return wall


SYSCALLS = "fsync,fdatasync,openat,rename,renameat,renameat2,unlink,unlinkat,futex"


def strace_counts(pids: list[int], run: Callable[[], None], out: Path) -> dict[str, int]:
    """Syscalls made by `pids` (and children they fork) while `run` runs: strace -c -f."""
    argv = [STRACE, "-f", "-c", "-o", str(out), "-e", f"trace={SYSCALLS}"]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # attaching to every thread of every process takes a moment
        run()
    finally:
        tracer.send_signal(signal.SIGINT)  # strace prints its summary on SIGINT
        try:
            tracer.wait(20)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(5)
    counts: dict[str, int] = {}
    for line in out.read_text(errors="replace").splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) >= 5 and fields[-1] in SYSCALLS.split(",") and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])
    return counts


def profile(settings: Settings, variants: list[Variant], tmp: Path) -> None:
    count = 1000  # enough samples for a stable split even with --quick
    print(f"Profile (--profile): py-spy --gil on serve (1 kHz: the thread holding the GIL,"
          f" i.e. serve's Python CPU) during one more c=20 run of {count} messages and its"
          f" delivery")
    if not os.access(PY_SPY, os.X_OK):
        print(f"  skipped: no {PY_SPY}")
    else:
        for v in variants:
            if v.serve is None:
                continue
            out = tmp / f"py-spy-{v.key}.txt"
            wall = py_spy_run(v, count, 20, out)
            categories, leaves, total = categorize(out.read_text(errors="replace"))
            total = max(1, total)
            print(f"  {v.label}: {count / wall:,.0f} msgs/s under py-spy; {total} samples")
            for name, n in categories.most_common():
                print(f"    {n / total * 100:5.1f} %  {name}")
            print("    busiest innermost frames: " + "; ".join(
                f"{frame} {n / total * 100:.1f} %" for frame, n in leaves.most_common(6)))
    if not os.access(STRACE, os.X_OK):
        print(f"  syscall counts skipped: no {STRACE}")
        return
    n = settings.messages
    print(f"  syscalls per message (strace -c -f over one c=1 run of {n} messages and its"
          f" delivery; strace slows everything down, so only the counts mean anything):")
    rows = []
    for v in variants:
        if v.serve is not None:
            pids = [v.serve.proc.pid] + v.serve.children()
        else:
            assert v.postfix is not None
            pids = v.postfix.pids()  # -f follows the daemons master forks meanwhile
            if v.milter is not None and v.milter.proc is not None:
                pids.append(v.milter.proc.pid)

        def one_run(v: Variant = v) -> None:
            smtp_source(v.port, n, 1)
            v.sent += n
            wait_delivered(v, 60 + n / 10)
            time.sleep(0.5)  # Postfix removes the queue file just after the sink's 250

        counts = strace_counts(pids, one_run, tmp / f"strace-{v.key}.txt")
        renames = sum(counts.get(c, 0) for c in ("rename", "renameat", "renameat2"))
        unlinks = sum(counts.get(c, 0) for c in ("unlink", "unlinkat"))
        fsyncs = counts.get("fsync", 0) + counts.get("fdatasync", 0)
        rows.append([v.label, f"{fsyncs / n:.2f}", f"{counts.get('openat', 0) / n:.2f}",
                     f"{renames / n:.2f}", f"{unlinks / n:.2f}",
                     f"{counts.get('futex', 0) / n:.1f}"])
    print(table(["variant", "fsync", "openat", "rename", "unlink", "futex"], rows))


# == main ====================================================================================
def preflight() -> None:
    missing = [p for p in (SMTP_SOURCE, SMTP_SINK, "/usr/sbin/postfix")
               if not os.access(p, os.X_OK)]
    if missing:
        raise BenchError("missing: " + ", ".join(missing) + " (Debian package postfix)")
    if os.geteuid() != 0:
        raise BenchError("the private Postfix instances need root")


def describe_machine() -> str:
    return machine_line(f"Postfix {postfix_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100 messages per run, 2 rounds (about 30 s)")
    parser.add_argument("--profile", action="store_true",
                        help="then py-spy serve during one more c=20 run per mailmoat variant,"
                             " and count syscalls per message on both sides with strace")
    args = parser.parse_args(argv)
    settings = Settings.make(args.quick)
    def body() -> int:
        with world_readable_tmpdir("mailmoat-bench-mta-") as tmp, \
                contextlib.ExitStack() as stack:
            result1 = part1(settings, tmp, stack)
            ok = print_part1(settings, result1)
            print()
            if args.profile:
                profile(settings, result1.variants, tmp)
                print()
            pf_rl = next(v for v in result1.variants if v.key == "pf+rl")
            print_part2(part2(tmp, pf_rl))
        return 0 if ok else 1
    return run_bench("mta.py", " --quick" if args.quick else "", preflight, describe_machine, body, errors=(smtplib.SMTPException,))


if __name__ == "__main__":
    sys.exit(main())
