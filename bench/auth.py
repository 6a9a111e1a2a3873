"""Messages per second through Postfix with mailmoat's auth milter against Postfix with
OpenDKIM and OpenDMARC, on the same signed message and the same DNS zones, in the same run.

    .venv/bin/python bench/auth.py [--quick] [--profile]

One Knot DNS on 127.X.Y.Z:53 serves pass.test (SPF, a 2048-bit DKIM key, DMARC p=reject).
smtp-source sends one rsa-sha256 signed message (-F) through four private Postfix instances
relaying to one smtp-sink: (a) no milter, (b) a do-nothing pymilter (the floor),
(c) OpenDKIM (verify) then OpenDMARC (SPF itself), (d) `mailmoat milter auth`. Every milter
listens on a unix socket. Variants alternate over rounds, at concurrency 1 and 20; the
table shows medians and the ratio (d)/(c). Before timing, one message per variant goes to a
second sink, where both sides' Authentication-Results must say dkim=pass and dmarc=pass.
OpenDKIM takes the DKIM key from a TestDNSData file made from the same zone (see
UnixOpenDkim: its DNS path crashes at concurrency 20). --profile: then py-spy on the auth
milter during one more c=20 run.

Everything listens on loopback only; every loop is bounded in count and time; every process
started here is stopped before exit, also on SIGTERM or Ctrl-C. Exit status 0 unless
something could not run or a check failed (missed targets are reported, not failures).
See bench/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from _common import SMTP_SINK, SMTP_SOURCE, smtp_sink, LogCounter, cpu_seconds, sink_messages  # noqa: E402
from _common import smtp_source as run_smtp_source  # noqa: E402
from _common import (ROOT, machine_line, postfix_version, BenchError, child_process, run_bench,
                     fmt_rate, median, table, verdict, wait_until, world_readable_tmpdir)

from tests.harness.dns_server import KnotServer  # noqa: E402  (after _common's sys.path)
from tests.harness.milter_proc import MilterProcess  # noqa: E402
from tests.harness.opendmarc import OpenDkimVerifier, OpenDmarc  # noqa: E402
from tests.harness.ports import LOOPBACK  # noqa: E402
from tests.harness.postfix import PostfixInstance  # noqa: E402
from tests.harness.sink import SmtpSink  # noqa: E402
from tests.integration.auth_world import (AUTHSERV_ID, make_keys, message,  # noqa: E402
                                          sign_rsa, zones)

PY_SPY = Path(sys.executable).parent / "py-spy"
DOMAIN = "pass.test"
SENDER = f"ceo@{DOMAIN}"
HELO = f"mail.{DOMAIN}"
RECIPIENT = "to@example.jp"
CHECK_RECIPIENT = "check@example.jp"  # routed to the check sink, which keeps the messages
RATIO_TARGET = 1.0  # (d) msgs/s over (c) msgs/s

# Loopback passes SPF for both sides: libspf2 (OpenDMARC) passes any loopback client
# whatever the record says, our milter evaluates the record, so the record must say so too.
SPF_LOOPBACK = '"v=spf1 ip4:127.0.0.0/8 -all"'

# The loopback client must be checked, so no internal networks; defaults otherwise (the HELO
# identity is checked too, as shipped: smtp-source's HELO has its own SPF record). The
# authserv-id is the gateway's hostname (the config below), as OpenDKIM's and OpenDMARC's.
POLICY = """\
internal_networks: []
auth: {}
"""

MAILLOG_BAD = re.compile(r"milter-reject|milter-hold|NOQUEUE: reject|status=(deferred|bounced)"
                         r"|warning: milter|fatal:|panic:")


@dataclass(frozen=True)
class Settings:
    quick: bool
    messages: int  # smtp-source -m per timed run
    rounds: int
    budget: float  # seconds: no new round starts after this, whatever `rounds` says
    profile_messages: int
    concurrencies: tuple[int, ...] = (1, 20)

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if quick:
            return cls(quick, messages=300, rounds=4, budget=60.0, profile_messages=1000)
        return cls(quick, messages=600, rounds=9, budget=240.0, profile_messages=2000)


# == the world: keys, zone, the signed message ===============================================
def pass_zone(records: list[str]) -> dict[str, list[str]]:
    """auth_world's pass.test (DKIM key, DMARC p=reject) with SPF allowing loopback, for
    the domain and for the HELO name."""
    kept = [r for r in records if "v=spf1" not in r]
    return {DOMAIN: [f"@ 300 IN TXT {SPF_LOOPBACK}", f"mail 300 IN TXT {SPF_LOOPBACK}", *kept]}


def domainkey_records(zone: dict[str, list[str]]) -> dict[str, str]:
    """The DKIM key records of `zone` as {DNS name: TXT value} (the quoted strings joined)."""
    records = {}
    for origin, lines in zone.items():
        for line in lines:
            owner, *_rest = line.split(None, 1)
            if "._domainkey" in owner and " TXT " in line:
                records[f"{owner}.{origin}"] = "".join(re.findall(r'"([^"]*)"', line))
    return records


def signed_message_file(workdir: Path) -> tuple[Path, dict[str, list[str]], int]:
    """The rsa-sha256 signed message as smtp-source -F wants it, the zones, its size."""
    keys = make_keys(workdir / "keys")  # 2048-bit RSA (openssl genrsa)
    # About 1 KB of body, like the other benches' -l 1000.
    body = "".join(f"Line {i:02d} of the quarterly figures: revenue, costs and the outlook"
                   f" for the next quarter.\r\n" for i in range(1, 14))
    signed = sign_rsa(message(SENDER, subject="Quarterly report", body=body), DOMAIN, keys)
    # smtp-source -F reads lines and appends CRLF to each: a CRLF file would send CR CR LF.
    # It also sends an empty line before the final dot, which DKIM's body canonicalizations
    # ignore (trailing empty lines), so the signature still verifies.
    path = workdir / "signed.eml"
    path.write_bytes(signed.replace(b"\r\n", b"\n"))
    return path, pass_zone(zones(keys)[DOMAIN]), len(signed)


# == OpenDKIM and OpenDMARC on unix sockets ==================================================
class UnixOpenDkim(OpenDkimVerifier):
    """OpenDKIM reading DKIM keys from a TestDNSData file made from the zone's records.

    The harness points its libunbound at the test server with ResolverConfiguration; Debian's
    OpenDKIM 2.11 then parses that file again for every message (strace: one open of it per
    message, no DNS packet: the key comes from libunbound's cache) with unbound's
    non-reentrant flex parser, and at concurrency 20 it dies within seconds ("fatal flex
    scanner internal error--end of buffer missed"; OpenDKIM issue #14). Keys from a data set
    cost it no more than those cache hits did, and nothing parses per message."""

    def __init__(self, dns: KnotServer, workdir: Path, unix_path: Path,
                 keys: dict[str, str]) -> None:
        super().__init__(dns, workdir, authserv_id=AUTHSERV_ID, unix_path=unix_path)
        self.keys = keys  # DNS name -> TXT value

    def config_lines(self) -> dict[str, str]:
        lines = super().config_lines()
        del lines["ResolverConfiguration"]
        data = self.workdir / "keys.txt"
        data.write_text("".join(f"{name} {value}\n" for name, value in self.keys.items()))
        lines["TestDNSData"] = f"file:{data}"
        return lines


# == variants and runs =======================================================================
@dataclass
class Variant:
    key: str  # a, b, c, d
    label: str
    milters: str = ""  # smtpd_milters
    pids: dict[str, int] = field(default_factory=dict)  # milter processes: name -> pid
    postfix: PostfixInstance | None = None
    port: int = 0
    sent: int = 0  # messages to the timing sink, warm-up included
    checked: int = 0  # messages to the check sink
    times: dict[int, list[float]] = field(default_factory=dict)  # concurrency -> wall times
    cpu: dict[int, float] = field(default_factory=dict)  # milter CPU seconds, timed runs
    timed: dict[int, int] = field(default_factory=dict)  # messages in the timed runs
    cpu_by: dict[str, float] = field(default_factory=dict)  # per milter process, timed runs

    def milter_cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}


def smtp_source(port: int, count: int, concurrency: int, message_file: Path,
                recipient: str = RECIPIENT) -> float:
    """`count` copies of the signed message, `concurrency` sessions at a time."""
    return run_smtp_source(port, count, concurrency, SENDER, recipient, message_file, HELO)


def send_and_wait(v: Variant, count: int, concurrency: int, message_file: Path,
                  recipient: str = RECIPIENT) -> float:
    """One run; then wait (bounded) until Postfix delivered all of it, so runs never overlap
    and the milters' CPU covers whole messages."""
    assert v.postfix is not None
    counter = LogCounter(v.postfix, MAILLOG_BAD)
    try:
        wall = smtp_source(v.port, count, concurrency, message_file, recipient)
    except BenchError as exc:
        raise BenchError(f"{v.label}, c={concurrency}: {exc}; maillog:\n"
                         + "\n".join(counter.problems()[:10])) from None
    if recipient == RECIPIENT:
        v.sent += count
    else:
        v.checked += count
    try:
        wait_until(lambda: counter.sent() >= count, 60 + count / 10,
                   f"{count} deliveries by Postfix ({v.label})", interval=0.05)
    except BenchError as exc:
        raise BenchError(f"{exc}; maillog:\n{counter.text()[-3000:]}") from None
    problems = counter.problems()
    if problems:
        raise BenchError(f"{v.label}: refused, held or deferred mail:\n"
                         + "\n".join(problems[:10]))
    return wall


# == correctness: both sides really verify ===================================================
def results_headers(raw: bytes) -> list[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [re.sub(r"\s+", " ", str(value)).strip()
            for value in msg.get_all("Authentication-Results") or []]


def check_verification(variants: list[Variant], check_sink: SmtpSink,
                       message_file: Path) -> list[str]:
    """Send one message per variant to the check sink; (c) and (d) must have written
    dkim=pass, spf=pass and dmarc=pass for pass.test. A benchmark of failing verification
    would measure the wrong thing, so a miss ends the run. Returns the headers seen."""
    seen = []
    for v in variants:
        before = len(check_sink.messages)
        send_and_wait(v, 1, 1, message_file, CHECK_RECIPIENT)
        try:
            got = check_sink.wait_for(before + 1, timeout=30)[before]
        except TimeoutError as exc:
            raise BenchError(f"{v.label}: the check message did not arrive: {exc}") from None
        headers = [h for h in results_headers(got.data)
                   if h.lower().startswith(AUTHSERV_ID)]
        joined = " | ".join(headers)
        if v.key in ("c", "d"):
            wanted = [rf"\bdkim=pass\b.*header\.d={re.escape(DOMAIN)}",
                      rf"\bspf=pass\b.*smtp\.mailfrom={re.escape(DOMAIN)}",
                      rf"\bdmarc=pass\b.*header\.from={re.escape(DOMAIN)}"]
            missing = [w for w in wanted if not any(re.search(w, h) for h in headers)]
            if missing:
                raise BenchError(f"{v.label}: verification did not pass (missing {missing});"
                                 f" Authentication-Results: {joined or '(none)'}")
            if v.key == "d" and len(headers) != 1:
                raise BenchError(f"{v.label}: expected one header of ours: {joined}")
        elif headers:
            raise BenchError(f"{v.label}: unexpected Authentication-Results: {joined}")
        if b"DKIM-Signature:" not in got.data:
            raise BenchError(f"{v.label}: the DKIM-Signature did not arrive at the sink")
        if v.key in ("c", "d"):
            seen.append(f"({v.key}) " + " | ".join(h[:240] for h in headers))
    return seen


# key=value, the value possibly double-quoted with backslash escapes (milters/core/eventlog).
LOG_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def auth_log_summary(log_text: str) -> tuple[int, Counter[str]]:
    """(messages our milter checked with spf, dkim and dmarc all passing, other outcomes)."""
    good, other = 0, Counter[str]()
    wanted = {"action": "tag", "spf": "pass", "dkim": f"pass:{DOMAIN}", "dmarc": "pass"}
    for line in log_text.splitlines():
        fields = dict(LOG_FIELD.findall(line))
        if fields.get("event") != "auth":
            if re.search(r"event=(milter_error|dns_error)|Traceback", line):
                other[line[:160]] += 1
            continue
        got = {key: fields.get(key, "") for key in wanted}
        if got == wanted:
            good += 1
        else:
            other[" ".join(f"{k}={v}" for k, v in got.items())] += 1
    return good, other


# == the run =================================================================================
@dataclass
class RunResult:
    variants: list[Variant]
    rounds_done: int
    headers_seen: list[str]
    sink_total: int
    auth_good: int
    auth_other: Counter[str]
    message_size: int
    profile: list[str] = field(default_factory=list)


def write_auth_config(workdir: Path, nameserver: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "policy.yaml").write_text(POLICY)
    config = workdir / "config.yaml"
    config.write_text(f"gateway: {{hostname: {AUTHSERV_ID}}}\nstore: memory://\n"
                      f"policy: policy.yaml\n"
                      f"dns: {{nameservers: [\"{nameserver}\"], timeout: 2s}}\n")
    return config


def run(settings: Settings, tmp: Path, with_profile: bool) -> RunResult:
    message_file, zone, size = signed_message_file(tmp)
    sockets = tmp / "sockets"
    sockets.mkdir()
    os.chmod(sockets, 0o755)  # smtpd runs as user postfix and must reach the milter sockets
    null_sock, dkim_sock, dmarc_sock, auth_sock = (
        sockets / "null.sock", sockets / "opendkim.sock", sockets / "opendmarc.sock",
        sockets / "auth.sock")
    variants = [
        Variant("a", "Postfix, no milter"),
        Variant("b", "+ do-nothing pymilter, all steps (floor)", f"unix:{null_sock}"),
        Variant("c", "+ OpenDKIM (verify) + OpenDMARC", f"unix:{dkim_sock} unix:{dmarc_sock}"),
        Variant("d", "+ mailmoat auth milter", f"unix:{auth_sock}"),
    ]
    by_key = {v.key: v for v in variants}
    pyenv = {**os.environ, "PYTHONPATH": str(ROOT)}
    sink_log = tmp / "smtp-sink.log"
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(KnotServer(zone, tmp))
        null = stack.enter_context(child_process(
            [sys.executable, str(Path(__file__).resolve().parent / "null_milter.py"),
             "--listen", f"unix:{null_sock}", "--steps", "all"], log=tmp / "null.log",
            env=pyenv))
        wait_until(lambda: null_sock.exists() or null.poll() is not None, 15, "null milter")
        if null.poll() is not None:
            raise BenchError(f"null milter exited: {(tmp / 'null.log').read_text()}")
        dkim = stack.enter_context(UnixOpenDkim(dns, tmp, dkim_sock, domainkey_records(zone)))
        # SPF checked by OpenDMARC itself (libspf2), as our milter does; it trusts OpenDKIM's
        # Authentication-Results (same authserv-id) for the DKIM part of DMARC.
        dmarc = stack.enter_context(OpenDmarc(dns, tmp, authserv_id=AUTHSERV_ID,
                                              spf_self_validate=True, unix_path=dmarc_sock))
        auth = stack.enter_context(MilterProcess(
            "auth", write_auth_config(tmp / "auth", dns.nameserver), tmp / "auth",
            unix_path=auth_sock))
        assert auth.proc is not None
        by_key["b"].pids = {"null milter": null.pid}
        by_key["c"].pids = {"opendkim": dkim.pid, "opendmarc": dmarc.pid}
        by_key["d"].pids = {"auth milter": auth.proc.pid}
        sink_port = stack.enter_context(smtp_sink(sink_log))
        check_sink = stack.enter_context(SmtpSink())
        for v in variants:
            v.postfix = stack.enter_context(PostfixInstance(
                relay_port=sink_port, smtpd_milters=v.milters, base_dir=tmp / f"pf-{v.key}",
                extra={
                    # Fewer delivery sessions to the sink: less CPU taken from what we time.
                    "smtp_connection_cache_on_demand": "yes",
                    # Postfix leaves the headers of a loopback client alone, as for mail
                    # from the Internet (no address rewriting under a signature).
                    "local_header_rewrite_clients": "",
                    "transport_maps": f"inline:{{{CHECK_RECIPIENT}=smtp:[{LOOPBACK}]:"
                                      f"{check_sink.port}}}",
                }))
            v.port = v.postfix.smtp_port

        rig = Rig(variants, check_sink, message_file, size, sink_log, auth, tmp)
        try:
            return measure(settings, rig, with_profile)
        except BenchError as exc:
            # Which milter misbehaved, and what it said: the peers log only on stderr.
            states = [f"{d.name} {'running' if d.is_running() else 'EXITED'}; log tail:\n"
                      f"{d.log_tail(10)}" for d in (dkim, dmarc)]
            states.append(f"auth milter {'running' if auth.proc.poll() is None else 'EXITED'};"
                          f" log tail:\n" + "\n".join(auth.log_text().splitlines()[-10:]))
            raise BenchError(f"{exc}\n" + "\n".join(states)) from None


@dataclass(frozen=True)
class Rig:
    """What run() started, for measure()."""

    variants: list[Variant]
    check_sink: SmtpSink
    message_file: Path
    message_size: int
    sink_log: Path
    auth: MilterProcess
    tmp: Path


def measure(settings: Settings, rig: Rig, with_profile: bool) -> RunResult:
    """Warm-up, the correctness check, the timed rounds, the optional profile."""
    variants = rig.variants
    for v in variants:  # warm up: daemons forked, DNS answers cached, code paged in
        send_and_wait(v, 20, 5, rig.message_file)
    headers_seen = check_verification(variants, rig.check_sink, rig.message_file)
    started = time.monotonic()
    rounds_done = 0
    for rnd in range(settings.rounds):
        if time.monotonic() - started > settings.budget:
            break
        for concurrency in settings.concurrencies:
            # Rotate the order each round so no variant always runs first or last.
            shift = rnd % len(variants)
            for v in variants[shift:] + variants[:shift]:
                before = v.milter_cpu()
                v.times.setdefault(concurrency, []).append(
                    send_and_wait(v, settings.messages, concurrency, rig.message_file))
                for name, seconds in v.milter_cpu().items():
                    used = seconds - before[name]
                    v.cpu[concurrency] = v.cpu.get(concurrency, 0.0) + used
                    v.cpu_by[name] = v.cpu_by.get(name, 0.0) + used
                v.timed[concurrency] = v.timed.get(concurrency, 0) + settings.messages
        rounds_done += 1
    auth_side = next(v for v in variants if v.key == "d")
    profile_lines = (profile_auth(settings, auth_side, rig.message_file, rig.tmp)
                     if with_profile else [])
    expected = sum(v.sent for v in variants)
    with contextlib.suppress(BenchError):  # a shortfall is reported below, not waited for
        wait_until(lambda: sink_messages(rig.sink_log) >= expected, 30, "the sink's counter")
    good, other = auth_log_summary(rig.auth.log_text())
    return RunResult(variants, rounds_done, headers_seen, sink_messages(rig.sink_log), good,
                     other, rig.message_size, profile_lines)


# == --profile: where the auth milter's time goes ============================================
# Where a sample belongs, by the files on its stack; the first match wins, so the specific
# areas come before the ones that contain them.
PROFILE_AREAS: list[tuple[str, re.Pattern[str]]] = [
    ("DKIM: RSA in dkimpy's pure Python (key parse, pow, padding)",
     re.compile(r"\(dkim/crypto\.py")),
    ("DKIM: the rest (dkimpy: parsing, canonicalization, hashing, key)",
     re.compile(r"milters/auth/dkim_check\.py")),
    ("SPF (MAIL FROM and HELO)", re.compile(r"milters/auth/spf\.py")),
    ("DMARC", re.compile(r"milters/auth/dmarc\.py")),
    ("the log line (log_event)", re.compile(r"milters/core/eventlog\.py")),
    ("Authentication-Results header, forged-header scan",
     re.compile(r"milters/auth/results_header\.py")),
    ("rest of the check (policy decision, edits)", re.compile(r"milters/auth/checker\.py")),
    ("pymilter adapter and message model", re.compile(r"milters/core/")),
]


def profile_auth(settings: Settings, v: Variant, message_file: Path, tmp: Path) -> list[str]:
    """py-spy --gil on the auth milter (the thread holding the GIL: its Python CPU) during one
    more c=20 run; the functions with the largest shares, inclusive and innermost."""
    count = settings.profile_messages
    lines = [f"Profile (--profile): py-spy --gil at 500 Hz on the auth milter during one more"
             f" c=20 run of {count} messages through (d)"]
    if not os.access(PY_SPY, os.X_OK):
        return lines + [f"  skipped: no {PY_SPY}"]
    out = tmp / "py-spy-auth.txt"
    pid = next(iter(v.pids.values()))
    spy = subprocess.Popen([str(PY_SPY), "record", "-p", str(pid), "-f", "raw", "-o", str(out),
                            "--gil", "--nonblocking", "-r", "500", "-d", str(int(60 + count / 10))],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)  # py-spy attaches
        wall = send_and_wait(v, count, 20, message_file)
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            spy.wait(20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
    if not out.exists():
        return lines + ["  py-spy wrote nothing"]
    inclusive, leaves, areas, total = Counter[str](), Counter[str](), Counter[str](), 0
    for line in out.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = [re.sub(r"\(/\S*?/(site-packages|python3\.\d+|main)/", "(", frame)
                  for frame in stack.split(";")]
        total += n
        leaves[frames[-1]] += n
        areas[next((name for name, pattern in PROFILE_AREAS
                    if any(pattern.search(frame) for frame in frames)), "other")] += n
        # Inclusive per function, not per line: a function sampled on several lines counts once.
        for function in {re.sub(r":\d+\)$", ")", frame) for frame in frames}:
            inclusive[function] += n
    total = max(1, total)
    lines.append(f"  {count / wall:,.0f} msgs/s under py-spy; {total} samples of Python CPU"
                 f" ({total / 500 / count * 1e3:.2f} ms/msg)")
    lines.append("  by area:")
    lines += [f"    {n / total * 100:5.1f} %  {name}" for name, n in areas.most_common()]
    lines.append("  inclusive (share of samples with the function on the stack):")
    lines += [f"    {n / total * 100:5.1f} %  {frame}" for frame, n in inclusive.most_common(12)]
    lines.append("  innermost (where the CPU was when sampled):")
    lines += [f"    {n / total * 100:5.1f} %  {frame}" for frame, n in leaves.most_common(8)]
    return lines


# == output ==================================================================================
def print_result(settings: Settings, result: RunResult) -> bool:
    """Print the table and checks; False if a check failed (a missed target is not one)."""
    n = settings.messages
    by_key = {v.key: v for v in result.variants}
    print(f"Messages/s until every message is accepted (smtp-source -F, one rsa-sha256 signed"
          f" message of {result.message_size:,} bytes, -m {n}, one session per message;"
          f" median of {result.rounds_done} rounds, variants alternated; ratios are the median"
          f" of per-round ratios)")
    headers = ["variant"]
    for c in settings.concurrencies:
        headers += [f"c={c} msgs/s", f"c={c} min..max", f"c={c} milter CPU ms/msg"]
    body = []
    for v in result.variants:
        row = [f"({v.key}) {v.label}"]
        for c in settings.concurrencies:
            times = v.times[c]
            row += [fmt_rate(n / median(times)),
                    f"{fmt_rate(n / max(times))}..{fmt_rate(n / min(times))}",
                    f"{v.cpu[c] / v.timed[c] * 1e3:.2f}" if v.pids else ""]
        body.append(row)
    for num, den, what in (("d", "c", f"target >= {RATIO_TARGET:.2f}"),
                           ("d", "b", "against the do-nothing floor"),
                           ("c", "b", "the peers against the floor"),
                           ("b", "a", "a do-nothing pymilter's own cost")):
        row = [f"ratio ({num})/({den}) msgs/s, {what}"]
        for c in settings.concurrencies:
            # Paired within each round (seconds apart, under the same load from other
            # tenants), then the median over rounds: steadier than a ratio of medians.
            pairs = [t_den / t_num for t_num, t_den in zip(by_key[num].times[c],
                                                           by_key[den].times[c])]
            ratio = median(pairs)
            mark = f" {verdict(ratio >= RATIO_TARGET)}" if (num, den) == ("d", "c") else ""
            cpu = ""
            if by_key[num].pids and by_key[den].pids:
                per_msg = [by_key[k].cpu[c] / by_key[k].timed[c] for k in (num, den)]
                cpu = f"{per_msg[0] / per_msg[1]:.2f}x"
            row += [f"{ratio:.3f}{mark}", f"{min(pairs):.2f}..{max(pairs):.2f}", cpu]
        body.append(row)
    print(table(headers, body))
    print("  milter CPU ms/msg: user+system CPU of the milter processes (/proc/PID/stat, all"
          " threads) over the timed runs, per message: (b) the null milter, (c) opendkim +"
          " opendmarc, (d) the auth milter; in ratio rows the CPU per message over the"
          " other's (lower is better)")
    c_side = by_key["c"]
    print("  (c) split, both concurrencies: " + ", ".join(
        f"{name} {seconds / sum(c_side.timed.values()) * 1e3:.2f} ms/msg"
        for name, seconds in c_side.cpu_by.items()))
    print("  all milters on unix sockets; (c) is OpenDKIM then OpenDMARC (smtpd_milters order),"
          " OpenDMARC checking SPF itself (libspf2) and taking DKIM from OpenDKIM's header;"
          " OpenDMARC and the auth milter ask the Knot DNS, OpenDKIM reads the DKIM key from a"
          " TestDNSData file made from the same zone (through ResolverConfiguration Debian's"
          " OpenDKIM 2.11 re-parses the unbound config per message and crashes at c=20:"
          " OpenDKIM issue #14)")
    print("  correctness, before timing (one message per variant to a second sink):")
    for line in result.headers_seen:
        print(f"    {line}")
    ok = True
    sent = sum(v.sent for v in result.variants)
    print(f"  checks: smtp-source saw no refusal or tempfail; every maillog shows each message"
          f" status=sent and no reject, hold, deferral or milter warning; smtp-sink counted"
          f" {result.sink_total} of {sent} sent ("
          + ", ".join(f"{v.key} {v.sent}" for v in result.variants) + ")")
    if result.sink_total != sent:
        ok = False
        print("  FAILED: the sink did not count every message sent")
    through_d = by_key["d"].sent + by_key["d"].checked
    print(f"  auth milter log: {result.auth_good} messages with spf=pass, dkim=pass:{DOMAIN},"
          f" dmarc=pass, action=tag; {through_d} went through (d)")
    if result.auth_good != through_d or result.auth_other:
        ok = False
        print(f"  FAILED: other outcomes or errors in the auth milter's log:"
              f" {dict(result.auth_other.most_common(5))}")
    if result.rounds_done < settings.rounds:
        print(f"  note: time budget of {settings.budget:.0f} s reached after"
              f" {result.rounds_done} of {settings.rounds} rounds")
    for line in result.profile:
        print(line)
    return ok


# == main ====================================================================================
def preflight() -> None:
    needed = (SMTP_SOURCE, SMTP_SINK, "/usr/sbin/postfix", "/usr/sbin/opendkim",
              "/usr/sbin/opendmarc", "/usr/sbin/knotd")
    missing = [p for p in needed if not os.access(p, os.X_OK)]
    if missing:
        raise BenchError("missing: " + ", ".join(missing)
                         + " (Debian packages postfix, opendkim, opendmarc, knot)")
    if os.geteuid() != 0:
        raise BenchError("needs root: private Postfix instances, Knot DNS on port 53, and"
                         " mount namespaces for the peers' resolv.conf")


def first_line(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return (proc.stdout or proc.stderr).strip().splitlines()[0]


def describe_machine() -> str:
    opendkim = first_line(["/usr/sbin/opendkim", "-V"]).split()[-1]
    opendmarc = first_line(["/usr/sbin/opendmarc", "-V"]).split()[-1]
    knot = first_line(["/usr/sbin/knotd", "-V"]).split()[-1]
    return machine_line(f"Postfix {postfix_version()}", f"OpenDKIM {opendkim}",
                        f"OpenDMARC {opendmarc}", f"Knot {knot}",
                        f"pymilter {importlib.metadata.version('pymilter')}",
                        f"dkimpy {importlib.metadata.version('dkimpy')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100 messages per run, 3 rounds (about a minute)")
    parser.add_argument("--profile", action="store_true",
                        help="then py-spy the auth milter during one more c=20 run")
    args = parser.parse_args(argv)
    settings = Settings.make(args.quick)
    def body() -> int:
        with world_readable_tmpdir("mailmoat-bench-auth-") as tmp:
            ok = print_result(settings, run(settings, tmp, args.profile))
        return 0 if ok else 1
    return run_bench("auth.py", " --quick" if args.quick else "", preflight, describe_machine, body)


if __name__ == "__main__":
    sys.exit(main())
