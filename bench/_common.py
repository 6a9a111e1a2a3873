"""Helpers shared by the benchmarks in bench/: paths, cleanup, statistics, tables.

Benchmarks run as scripts (`.venv/bin/python bench/NAME.py`), so sys.path[0] is bench/;
importing this module puts the project root on sys.path too, for `milters`, `mta` and the
test harness (tests/harness), which the benchmarks reuse rather than duplicate.
"""
from __future__ import annotations

import contextlib
import os
import platform
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The project root goes first: a script runs with bench/ as sys.path[0], where bench/mta.py
# would otherwise shadow the `mta` package.
if str(ROOT) in sys.path:
    sys.path.remove(str(ROOT))
sys.path.insert(0, str(ROOT))

class BenchError(RuntimeError):
    """Something the benchmark needs could not run: the script exits non-zero."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP as an exception, so every `with` block unwinds and stops what it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # Once is enough: a second signal must not interrupt the clean-up the first one started.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def exit_cleanly_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


def machine_line(*tools: str) -> str:
    """When and on what a run happened: the date, CPUs, load, Python and the tools given."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {os.cpu_count()} CPUs, load"
            f" {load}; Python {platform.python_version()}"
            + "".join(f", {tool}" for tool in tools))


def postfix_version() -> str:
    return subprocess.run(["/usr/sbin/postconf", "-dh", "mail_version"], capture_output=True,
                          text=True, timeout=10).stdout.strip() or "?"


def run_bench(name: str, flags: str, preflight: Callable[[], None],
              describe: Callable[[], str], body: Callable[[], int],
              errors: tuple[type[BaseException], ...] = ()) -> int:
    """A benchmark's main: checks, the machine line, the body (its exit status); Ctrl-C or
    SIGTERM ends it with 128+signal after everything is stopped, a failure to run with 1."""
    exit_cleanly_on_sigterm()
    try:
        preflight()
        print(f"bench/{name}{flags}: {describe()}")
        print("Shared machine: absolute numbers are noisy; compare ratios within one run.\n")
        return body()
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"bench/{name}: {str(exc) or 'interrupted'}; everything it started is stopped"
              " and its files are removed", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    except (BenchError, OSError, RuntimeError, subprocess.SubprocessError, *errors) as exc:
        # RuntimeError covers the harnesses' PostfixError, DnsHarnessError, MilterDaemonError
        # and MilterProcess's start failure; the traceback helps find the cause.
        traceback.print_exc()
        print(f"bench/{name}: could not run: {exc}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def world_readable_tmpdir(prefix: str) -> Iterator[Path]:
    """A directory under /tmp that user postfix can search (mode 0755), removed afterwards.

    smtpd runs as user postfix and must reach unix milter sockets; mkdtemp makes 0700.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")).resolve()
    try:
        os.chmod(path, 0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def child_process(argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` for the duration of the block; SIGTERM it (then SIGKILL) on the way out."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a child we started, by its pid only; never leaves it running."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.02) -> None:
    """Poll `predicate` until true; BenchError after `timeout` seconds (never forever)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# -- statistics -------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of nothing")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (no interpolation needed here)."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


# -- output -----------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          right: Sequence[bool] | None = None) -> str:
    """A plain-text table; numeric columns right-aligned so digits line up."""
    right = right or [False] + [True] * (len(headers) - 1)
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w)
                         for c, w, r in zip(cells, widths, right)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


SMTP_SOURCE = "/usr/sbin/smtp-source"


def smtp_source(port: int, count: int, concurrency: int, sender: str, recipient: str,
                message_file: Path | None = None, helo: str | None = None) -> float:
    """Send `count` messages with Postfix's smtp-source, `concurrency` sessions at a time, one
    session per message, to 127.0.0.1:port; return the wall time. The message is 1000 bytes
    of smtp-source's own, or `message_file` (-F: LF line ends). smtp-source exits non-zero on
    any unexpected reply, so a refusal or tempfail cannot go unnoticed."""
    content = ["-F", str(message_file)] if message_file is not None else ["-l", "1000"]
    argv = [SMTP_SOURCE, "-c", *content, *(["-M", helo] if helo else []), "-m", str(count),
            "-s", str(concurrency), "-f", sender, "-t", recipient, f"127.0.0.1:{port}"]
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=30 + count / 5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}:"
                         f" {proc.stdout.decode(errors='replace')[-500:]}"
                         f" {proc.stderr.decode(errors='replace')[-500:]}")
    return wall


SMTP_SINK = "/usr/sbin/smtp-sink"


@contextlib.contextmanager
def smtp_sink(log: Path, port: int = 0, user: str = "nobody") -> Iterator[int]:
    """Postfix's smtp-sink on 127.0.0.1 for the block (a free port unless `port` is given,
    picked just before it binds); yields the port. Its counts go to `log` (sink_messages)."""
    from tests.harness.ports import LOOPBACK, free_port, is_listening
    port = port or free_port()
    # As root smtp-sink refuses to run without -u; it drops to that user after bind.
    with child_process([SMTP_SINK, "-u", user, "-c", f"{LOOPBACK}:{port}", "1000"],
                       log=log) as sink:
        wait_until(lambda: is_listening(LOOPBACK, port) or sink.poll() is not None, 10,
                   f"smtp-sink on port {port}")
        if sink.poll() is not None:
            raise BenchError(f"smtp-sink exited: {log.read_text(errors='replace')}")
        yield port


def sink_messages(log: Path) -> int:
    """smtp-sink -c rewrites 'sess=N quit=N mesg=N' with CRs; the last one is the total."""
    found = re.findall(r"mesg=(\d+)", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


class LogCounter:
    """Counts one Postfix instance's maillog lines from a byte offset on: deliveries, and the
    lines `bad` matches (refusals, deferrals, milter trouble)."""

    def __init__(self, postfix: Any, bad: re.Pattern[str]) -> None:
        self.postfix = postfix
        self.bad = bad
        self.offset = postfix.log_offset()

    def text(self) -> str:
        with open(self.postfix.maillog, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode("utf-8", "replace")

    def sent(self) -> int:
        return self.text().count(" status=sent ")

    def problems(self) -> list[str]:
        return [line for line in self.text().splitlines() if self.bad.search(line)]


def proc_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may contain spaces); field 3 is [0]."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """user + system CPU of a process (all its threads); with reaped_children also of the
    children it waited for, which is where Postfix's exited daemons end up (master's
    cutime/cstime)."""
    fields = proc_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def ratelimit_show(config: Path) -> str:
    """`mailmoat ratelimit show` for a config: proof the milter's store really counted."""
    proc = subprocess.run([sys.executable, "-m", "mta.cli", "ratelimit", "show",
                           "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise BenchError(f"mailmoat ratelimit show exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


# As root serve must be told whom to become (mta/gateway/privileges.py); root here keeps the
# figures comparable with the runs taken before serve dropped privileges.
RUN_AS = "root" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


def gateway_yaml(ports: tuple[int, int, int], sink_port: int, extra: str = "") -> str:
    """The `gateway:` section every bench's serve runs with: (listen, reinject, metrics) on
    loopback, relaying example.jp to the sink; `extra` is more gateway lines, indented."""
    from tests.harness.ports import LOOPBACK
    port, reinject, metrics = ports
    return f"""\
gateway:
  hostname: mx.bench.test
  listen: {LOOPBACK}:{port}
  user: {RUN_AS}
  reinject_listen: {LOOPBACK}:{reinject}
  metrics_listen: {LOOPBACK}:{metrics}
  relay_domains: [example.jp]
  relay: {{default: "smtp:[{LOOPBACK}]:{sink_port}"}}
  queue: {{dir: spool}}
  max_message_size: 60000000
{extra}"""
