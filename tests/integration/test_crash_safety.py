"""Nothing is lost: `serve` killed with SIGKILL while it receives and delivers a bounded
batch; after a restart every message that got a 250 is delivered. Duplicates (delivered,
then killed before the queue entry was removed) are counted and reported, as at-least-once
delivery allows.

The later tests kill every process of the gateway at once (serve, `mailmoat deliver` and
each milter: the whole process group, as a power cut would), several times at seeded random
moments, with the auth and ratelimit milters in the chain and delivery both over SMTP to a
loopback sink and to a Maildir. After each kill they measure the deliveries in flight (the
next hop already has the message for a recipient the spool still lists as pending: it will
be delivered again) and then assert, per message and recipient, that nothing acknowledged
was lost and that every extra copy was in flight at a kill. Killing only the milters or
only the delivery process must lose nothing either, and no message may get 250 unless both
milters saw it to its end (the auth milter's header is in every copy, the ratelimit milter
logged the message's queue ID at end of message). Set MAILMOAT_CRASH_SEED to replay a run.
"""
from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from mta.queue.spool import NoSuchMessage, Queue
from tests.harness.dns_server import KnotServer
from tests.harness.sink import SmtpSink
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

CLIENTS, PER_CLIENT, KILL_AFTER = 4, 40, 70


def send_batch(port: int, client: int, acked: set[str], lock: threading.Lock) -> None:
    for n in range(PER_CLIENT):
        tag = f"c{client}-m{n}"
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                # sendmail returns only after the 250 to DATA, and raises on anything else.
                smtp.sendmail("app@example.jp", ["taro@example.jp"],
                              f"Subject: crash test\r\nX-Test-ID: {tag}\r\n\r\n{tag}\r\n")
        except (OSError, smtplib.SMTPException):
            return  # the gateway died under us: this message was never acknowledged
        with lock:
            acked.add(tag)


def delivered_ids(maildir: Path) -> list[str]:
    box = maildir / "taro@example.jp" / "new"
    if not box.exists():
        return []
    return [m.group(1).decode() for f in box.iterdir()
            if (m := re.search(rb"X-Test-ID: (\S+)", f.read_bytes()))]


def test_sigkill_loses_no_acknowledged_message(tmp_path: Path) -> None:
    roomy = "ratelimit:\n  limits: [{name: m, rate: 1000/s, burst: 100000}]\n"
    gateway = Serve(tmp_path, policy=roomy).start()
    acked: set[str] = set()
    lock = threading.Lock()
    threads = [threading.Thread(target=send_batch, args=(gateway.port, c, acked, lock))
               for c in range(CLIENTS)]
    for t in threads:
        t.start()
    while len(acked) < KILL_AFTER and any(t.is_alive() for t in threads):
        threading.Event().wait(0.01)
    assert gateway.proc is not None
    gateway.proc.kill()  # SIGKILL: no chance to clean up
    gateway.proc.wait(10)
    for t in threads:
        t.join(30)
    killed_with = len(acked)
    assert KILL_AFTER <= killed_with < CLIENTS * PER_CLIENT
    # The milter child must not outlive a killed serve (it would hold its socket).
    milter_pid = int(gateway.wait_log(r"milter=ratelimit pid=(\d+)").group(1))
    for _ in range(100):
        try:
            os.kill(milter_pid, 0)
        except ProcessLookupError:
            break
        threading.Event().wait(0.05)
    else:
        pytest.fail(f"milter {milter_pid} survived the SIGKILL of serve")

    gateway.start("serve-restarted.log")  # same config, spool and maildir
    try:
        gateway.wait_log(r"event=serve_started")
        deadline = 30.0
        while deadline > 0 and not acked <= set(delivered_ids(tmp_path / "maildir")):
            threading.Event().wait(0.2)
            deadline -= 0.2
    finally:
        assert gateway.stop() == 0
    delivered = delivered_ids(tmp_path / "maildir")
    missing = acked - set(delivered)
    duplicates = len(delivered) - len(set(delivered))
    print(f"\ncrash test: {killed_with} acknowledged before SIGKILL, {len(set(delivered))} "
          f"delivered, {len(missing)} lost, {duplicates} duplicate(s)")
    assert not missing, f"acknowledged but never delivered: {sorted(missing)}"


# -- every process of the gateway, killed several times ------------------------------------

AUTHSERV_ID = "mx.mailmoat.test"  # Serve's hostname: the auth milter's authserv-id
SENDER = "app@sender.test"
HELO = "mail.sender.test"
CLIENT_IP = "192.0.2.10"  # in sender.test's SPF record: the messages pass SPF and DMARC
LOCAL, REMOTE = "taro@example.jp", "jiro@sink.example"  # Maildir; SMTP to the sink
ZONES = {"sender.test": ['@ 300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"',
                         '_dmarc 300 IN TXT "v=DMARC1; p=none"']}
# Generous limits (nothing here is over them), and a tiny score for dkim=none (no message is
# signed): the ratelimit milter then reads every message's auth results at end of message,
# after the auth milter, and logs event=points with its queue ID: our witness that it saw
# the message before the 250. tempfail_at is far above what the points add up to.
CHAIN_POLICY = """\
ratelimit:
  limits: [{name: m, rate: 1000/s, burst: 100000}]
  points:
    tempfail_at: 1000000000
    auth_results: {dkim=none: 0.001}
"""
ROLES = ("deliver", "milter auth", "milter ratelimit")
ROUNDS = 4
BATCH_CLIENTS, BATCH_SESSIONS, SESSION_MESSAGES = 3, 6, 4  # per round: up to 72 messages
ATTEMPTS, RETRY_PAUSE = 4, 0.3  # a refused message is tried again this often, this much later
DRAIN_TIMEOUT = 40.0  # seconds for the queue to empty after the last restart
Pair = tuple[str, str]  # (the message's test ID, a recipient): one delivery


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnotServer]:
    with KnotServer(ZONES, tmp_path_factory.mktemp("crash-dns")) as server:
        yield server


@pytest.fixture
def seed() -> int:
    chosen = int(os.environ.get("MAILMOAT_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nMAILMOAT_CRASH_SEED={chosen}")
    return chosen


class Gateway(Serve):
    """`serve` with the auth and ratelimit milters, Maildir for example.jp and SMTP to the
    sink for sink.example; started as the leader of its own process group, so that one
    killpg() reaches serve and every process it started at the same instant."""

    def __init__(self, tmp_path: Path, sink: SmtpSink, nameserver: str) -> None:
        super().__init__(tmp_path, policy=CHAIN_POLICY,
                         milters=("milters: [{name: auth}, {name: ratelimit}]\n"
                                  f"dns: {{nameservers: [\"{nameserver}\"], timeout: 2s}}\n"))
        self.config.write_text(self.config.read_text()
                               .replace("relay_domains: [example.jp]",
                                        "relay_domains: [example.jp, sink.example]")
                               .replace('relay: {default: "maildir:maildir"}',
                                        '''relay: {default: "maildir:maildir", routes: '''
                                        f'''{{sink.example: "smtp:[127.0.0.1]:{sink.port}"}}}}'''))
        self.sink, self.spool, self.maildir = sink, tmp_path / "var" / "spool", tmp_path / "maildir"
        self.logs: list[Path] = []

    own_session = True
    start_timeout = 30.0  # a restart replays the spool; the machine may be loaded

    def start(self, log_name: str = "serve.log", event_loop: str | None = None,
              env: dict[str, str] | None = None) -> "Gateway":
        super().start(log_name, event_loop, env)
        self.logs.append(self.log)
        return self

    def processes(self) -> dict[int, str]:
        """serve and every process below it (from /proc), by PID: their role."""
        assert self.proc is not None
        found = {self.proc.pid: "serve"}
        parents = _parents()
        grew = True
        while grew:  # children of children too (converter workers, if a milter has any)
            grew = False
            for pid, ppid in parents.items():
                if ppid in found and pid not in found:
                    found[pid] = _role(pid)
                    grew = True
        return found

    def kill_everything(self) -> dict[int, str]:
        """SIGKILL serve and all its processes at one instant; returns what was killed."""
        assert self.proc is not None
        victims = self.processes()
        assert sorted(victims.values()) == sorted(("serve",) + ROLES), victims
        for pid in victims:  # all in serve's group, so the one signal reaches every one
            assert _stat(pid)[1] == self.proc.pid, f"{victims[pid]} left serve's group"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        _wait_gone(victims)
        return victims

    def pending(self) -> set[Pair]:
        """The deliveries the spool still owes: (test ID, recipient) per pending recipient."""
        queue, owed = Queue(self.spool), set()
        for envelope in queue.entries():
            try:
                tag = _test_id(queue.message(envelope.queue_id))
            except NoSuchMessage:
                continue  # delivered and removed while we looked (a live gateway)
            owed |= {(tag, rcpt.address) for rcpt in envelope.pending()}
        return owed

    def queue_ids(self) -> list[str]:
        return [envelope.queue_id for envelope in Queue(self.spool).entries()]

    def delivered(self) -> Counter[Pair]:
        """Every copy that reached the sink or a Maildir's new/, by (test ID, recipient)."""
        copies: Counter[Pair] = Counter()
        for message in self.sink.messages:
            copies.update((_test_id(message.data), rcpt) for rcpt in message.rcpt_tos)
        box = self.maildir / LOCAL / "new"
        if box.exists():
            copies.update((_test_id(path.read_bytes()), LOCAL) for path in box.iterdir())
        return copies

    def copies(self) -> list[bytes]:
        found = [message.data for message in self.sink.messages]
        box = self.maildir / LOCAL / "new"
        return found + ([path.read_bytes() for path in box.iterdir()] if box.exists() else [])

    def all_logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.logs)


def _parents() -> dict[int, int]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                table[int(entry)] = _stat(int(entry))[0]
            except (FileNotFoundError, ProcessLookupError):
                continue
    return table


def _stat(pid: int) -> tuple[int, int, str]:
    """(parent PID, process group, state) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name, in parentheses, may hold spaces: split after its closing one.
        fields = stat.read().rpartition(")")[2].split()
    return int(fields[1]), int(fields[2]), fields[0]


def _role(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
    except FileNotFoundError:
        return "gone"
    words = [arg.decode(errors="replace") for arg in argv]
    if "mta.cli" in words:
        rest = words[words.index("mta.cli") + 1:]
        return " ".join(rest[:2]) if rest[:1] == ["milter"] else rest[0]
    return " ".join(words)


def _wait_gone(victims: dict[int, str], timeout: float = 10.0) -> None:
    """Until every PID is gone or a zombie (dead, only not yet reaped)."""
    deadline = time.monotonic() + timeout
    for pid, role in victims.items():
        while True:
            try:
                if _stat(pid)[2] in "ZX":
                    break
            except (FileNotFoundError, ProcessLookupError):
                break
            assert time.monotonic() < deadline, f"{role} (pid {pid}) survived SIGKILL"
            time.sleep(0.02)


def _test_id(raw: bytes) -> str:
    match = re.search(rb"^X-Test-ID: (\S+)", raw, re.MULTILINE)
    assert match, raw[:300]
    return match.group(1).decode()


@dataclass
class Traffic:
    """A bounded batch from a few clients over the gateway's SMTP port, in sessions of up to
    SESSION_MESSAGES messages. After a 4xx a client goes on in the same session (as a sender
    with more mail would: a hostile one hopes the next message slips through) and tries the
    refused message again later, up to ATTEMPTS times, in a new session after a pause; after
    a broken connection it opens a new one. It stops when the gateway is gone, when its
    messages are done, or at stop()."""

    port: int
    name: str
    rng: random.Random
    acked: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # tag: (ID, rcpts)
    refused: Counter[str] = field(default_factory=Counter)  # replies other than 250
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> "Traffic":
        plans = [[self._recipients() for _ in range(BATCH_SESSIONS * SESSION_MESSAGES)]
                 for _ in range(BATCH_CLIENTS)]  # drawn here: the seed alone decides them
        self._threads = [threading.Thread(target=self._client, args=(c, plan), daemon=True)
                         for c, plan in enumerate(plans)]
        for thread in self._threads:
            thread.start()
        return self

    @property
    def total(self) -> int:
        return BATCH_CLIENTS * BATCH_SESSIONS * SESSION_MESSAGES

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), "a client did not stop"

    def _recipients(self) -> tuple[str, ...]:
        return self.rng.choice(((LOCAL,), (REMOTE,), (LOCAL, REMOTE)))

    def _client(self, client: int, plan: list[tuple[str, ...]]) -> None:
        todo = [(f"{self.name}-c{client}-m{n}", rcpts, 1) for n, rcpts in enumerate(plan)]
        for _ in range(BATCH_SESSIONS * ATTEMPTS):
            if not todo or self._stop.is_set():
                return
            try:
                smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
            except OSError:
                return  # the gateway is down: nothing more to acknowledge
            later = []
            try:
                smtp.ehlo(HELO)
                if smtp.docmd("XCLIENT", f"ADDR={CLIENT_IP}")[0] != 220:
                    continue
                smtp.ehlo(HELO)
                for _ in range(SESSION_MESSAGES):
                    if not todo or self._stop.is_set():
                        break
                    tag, rcpts, attempt = todo.pop(0)
                    if not self._send(smtp, tag, rcpts) and attempt < ATTEMPTS:
                        later.append((tag, rcpts, attempt + 1))
            except (OSError, smtplib.SMTPException):
                pass  # the message under way was not acknowledged; next session
            finally:
                smtp.close()
            todo += later
            if later:
                self._stop.wait(RETRY_PAUSE)

    def _send(self, smtp: smtplib.SMTP, tag: str, rcpts: tuple[str, ...]) -> bool:
        """One message; True once it got 250. A 421 ends the session (raises)."""
        code, reply = smtp.mail(SENDER)
        if code == 250:
            for rcpt in rcpts:
                code, reply = smtp.rcpt(rcpt)
                if code != 250:
                    break
        if code == 250:
            body = (f"From: {SENDER}\r\nTo: {', '.join(rcpts)}\r\nSubject: crash {tag}\r\n"
                    f"Message-ID: <{tag}@sender.test>\r\nX-Test-ID: {tag}\r\n\r\n{tag}\r\n")
            code, reply = smtp.data(body.encode())
        if code == 250:
            with self._lock:
                self.acked[tag] = (reply.decode().rsplit(" ", 1)[1], rcpts)
            return True
        with self._lock:
            self.refused[f"{code}"] += 1
        if code == 421:
            raise smtplib.SMTPServerDisconnected("421")
        smtp.rset()
        return False


def _wait_for(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _wait_acked(traffic: Traffic, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while traffic.count() < count and traffic.running():
        assert time.monotonic() < deadline, f"only {traffic.count()} of {count} acknowledged"
        time.sleep(0.005)


def _wait_delivered(gateway: Gateway, traffic: Traffic, count: int,
                    timeout: float = 30.0) -> None:
    """Until `count` copies are delivered, or the batch is in and the queue is empty."""
    deadline = time.monotonic() + timeout
    while sum(gateway.delivered().values()) < count:
        if not traffic.running() and not gateway.queue_ids():
            return
        assert time.monotonic() < deadline, f"fewer than {count} copies delivered"
        time.sleep(0.005)


def _drain(gateway: Gateway, context: str) -> None:
    """Wait (bounded) until the queue is empty: every entry delivered and removed (a copy is
    made before its entry goes, so what is missing then is lost, not late)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while gateway.queue_ids():
        if time.monotonic() > deadline:
            stuck = [(e.queue_id, e.attempts, e.next_attempt, [r.last_reply for r in e.recipients])
                     for e in Queue(gateway.spool).entries()]
            pytest.fail(f"{context}: {len(stuck)} entries stuck in the queue after "
                        f"{DRAIN_TIMEOUT:.0f}s: {stuck[:10]}")
        time.sleep(0.1)


def _acked_pairs(traffics: list[Traffic]) -> set[Pair]:
    return {(tag, rcpt) for traffic in traffics
            for tag, (_, rcpts) in traffic.acked.items() for rcpt in rcpts}


def _assert_milters_saw_every_acked_message(gateway: Gateway, traffics: list[Traffic],
                                            context: str) -> None:
    """No 250 without both milters: every copy carries the auth milter's header (it adds it
    at end of message), and the ratelimit milter logged each acked queue ID at end of
    message (its points for dkim=none), which the MTA waits for before it answers."""
    ours = re.compile(rb"^Authentication-Results:\s*" + re.escape(AUTHSERV_ID.encode()) + rb";",
                      re.MULTILINE | re.IGNORECASE)
    unchecked = [copy[:200] for copy in gateway.copies() if not ours.search(copy)]
    assert not unchecked, f"{context}: delivered without the auth milter: {unchecked[:3]}"
    seen = set(re.findall(r"event=points milter=ratelimit queue_id=(\w+)", gateway.all_logs()))
    unseen = sorted(tag for traffic in traffics for tag, (queue_id, _) in traffic.acked.items()
                    if queue_id not in seen)
    assert not unseen, f"{context}: 250 without the ratelimit milter for {unseen[:10]}"


def _verdict(gateway: Gateway, traffics: list[Traffic], in_flight: Counter[Pair],
             context: str) -> tuple[int, int]:
    """Assert nothing acked is lost and every extra copy was in flight at a kill; returns
    (lost, duplicates)."""
    copies = gateway.delivered()
    lost = sorted(_acked_pairs(traffics) - set(copies))
    duplicates = sum(count - 1 for count in copies.values())
    unexplained = {pair: count for pair, count in copies.items()
                   if count - 1 > in_flight[pair]}
    assert not lost, f"{context}: acknowledged but never delivered: {lost[:10]} ({len(lost)})"
    assert not unexplained, (f"{context}: copies beyond the deliveries in flight at the kills:"
                             f" {dict(list(unexplained.items())[:10])}")
    assert duplicates <= sum(in_flight.values())
    return len(lost), duplicates


def _snapshot_in_flight(gateway: Gateway, before: Counter[Pair]
                        ) -> tuple[set[Pair], Counter[Pair], set[Pair]]:
    """Right after a kill: what the spool still owes, what the next hops hold (once the sink
    has read what the dead process had sent), and the deliveries in flight: owed, yet a copy
    arrived since `before` (the snapshot at the previous kill, or empty), so the killed
    process sent it and it will be sent again. Each extra copy is counted at one kill only."""
    owed = gateway.pending()
    time.sleep(0.3)  # the sink ends the DATA already in its socket buffer
    held = gateway.delivered()
    return owed, held, {pair for pair in owed if held[pair] > before[pair]}


def test_sigkill_of_every_gateway_process_loses_nothing(tmp_path: Path, dns: KnotServer,
                                                        seed: int) -> None:
    rng = random.Random(seed)
    context = f"MAILMOAT_CRASH_SEED={seed}"
    in_flight: Counter[Pair] = Counter()
    held: Counter[Pair] = Counter()
    traffics: list[Traffic] = []
    rounds = []
    with SmtpSink() as sink:
        gateway = Gateway(tmp_path, sink, dns.nameserver).start()
        try:
            for number in range(ROUNDS):
                traffic = Traffic(gateway.port, f"r{number}", rng).start()
                traffics.append(traffic)
                # Mostly while mail comes in and goes out at once; now and then later, while
                # the last of it is delivered.
                kill_at = rng.randint(traffic.total // 8, traffic.total)
                linger = rng.choice((0.0, 0.0, rng.uniform(0.0, 0.05), rng.uniform(0.0, 0.3)))
                _wait_acked(traffic, kill_at)
                time.sleep(linger)
                killed = gateway.kill_everything()
                traffic.stop()
                owed, held, flying = _snapshot_in_flight(gateway, held)
                in_flight.update(flying)
                rounds.append(f"round {number}: killed {len(killed)} processes after "
                              f"{traffic.count()} acked (+{linger:.2f}s), {len(owed)} "
                              f"deliveries owed, {len(flying)} in flight")
                gateway.start(f"serve-{number + 1}.log")  # same config, spool, Maildir
            _drain(gateway, context)
        finally:
            if gateway.proc is not None and gateway.proc.poll() is None:
                assert gateway.stop() == 0
        lost, duplicates = _verdict(gateway, traffics, in_flight, context)
        _assert_milters_saw_every_acked_message(gateway, traffics, context)
    print("\n".join(rounds))
    print(f"every-process crash test ({context}): {len(_acked_pairs(traffics))} acked "
          f"deliveries, {lost} lost, {duplicates} duplicate(s), "
          f"{sum(in_flight.values())} in flight at the kills")


def _pids(gateway: Gateway, roles: set[str]) -> dict[int, str]:
    return {pid: role for pid, role in gateway.processes().items() if role in roles}


def _wait_restarted(gateway: Gateway, killed: dict[int, str]) -> None:
    """Until serve runs a new process in each killed one's role (bounded)."""
    def back() -> bool:
        now = _pids(gateway, set(killed.values()))
        return sorted(now.values()) == sorted(killed.values()) and not set(now) & set(killed)
    _wait_for(f"serve to restart {sorted(killed.values())}", back, 30.0)


def _kill_moments(rng: random.Random, traffic: Traffic, count: int) -> list[int]:
    """Acknowledgement counts at which to kill: spread over the batch, none at its end."""
    return sorted(rng.sample(range(traffic.total // 8, traffic.total * 3 // 4), count))


def test_sigkill_of_the_milters_alone_lets_no_message_through_unchecked(
        tmp_path: Path, dns: KnotServer, seed: int) -> None:
    """serve restarts the killed milters; meanwhile their messages get on_failure (tempfail,
    451), and the client goes on in the same session: none of them may get 250 unchecked."""
    rng = random.Random(seed)
    context = f"MAILMOAT_CRASH_SEED={seed}"
    kills = []
    with SmtpSink() as sink:
        gateway = Gateway(tmp_path, sink, dns.nameserver).start()
        try:
            traffic = Traffic(gateway.port, "m", rng).start()
            for moment in _kill_moments(rng, traffic, 3):
                _wait_acked(traffic, moment)
                roles = rng.choice(({"milter auth"}, {"milter ratelimit"},
                                    {"milter auth", "milter ratelimit"}))
                victims = _pids(gateway, roles)
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
                kills.append(f"{sorted(roles)} after {traffic.count()} acked")
                _wait_restarted(gateway, victims)
            _wait_for("the clients to finish", lambda: not traffic.running(), 60.0)
            traffic.stop()
            _drain(gateway, context)
        finally:
            assert gateway.stop() == 0
        lost, duplicates = _verdict(gateway, [traffic], Counter(), context)
        _assert_milters_saw_every_acked_message(gateway, [traffic], context)
    assert sum(traffic.refused.values()) > 0, f"{context}: no kill hit the traffic"
    assert traffic.count() > 0
    print(f"\nmilters killed ({context}): {'; '.join(kills)}; {traffic.count()} of "
          f"{traffic.total} acked, refused {dict(traffic.refused)}, {lost} lost, "
          f"{duplicates} duplicate(s)")


def test_sigkill_of_the_delivery_process_alone_loses_nothing(
        tmp_path: Path, dns: KnotServer, seed: int) -> None:
    """serve restarts `mailmoat deliver`; what it had sent but not yet removed from the
    spool is sent again (counted as in flight), nothing else twice, nothing lost."""
    rng = random.Random(seed)
    context = f"MAILMOAT_CRASH_SEED={seed}"
    in_flight: Counter[Pair] = Counter()
    held: Counter[Pair] = Counter()
    kills = []
    with SmtpSink() as sink:
        gateway = Gateway(tmp_path, sink, dns.nameserver).start()
        assert gateway.proc is not None
        try:
            traffic = Traffic(gateway.port, "d", rng).start()
            # Moments counted in copies delivered since the last (re)start: the process is
            # at work when it dies.
            for _ in range(3):
                _wait_delivered(gateway, traffic, sum(gateway.delivered().values())
                                + rng.randint(1, traffic.total // 3))
                # serve is frozen while we look, so that it cannot restart delivery (and
                # deliver again) before the spool and the next hops are measured.
                os.kill(gateway.proc.pid, signal.SIGSTOP)
                try:
                    victims = _pids(gateway, {"deliver"})
                    assert len(victims) == 1, victims
                    for pid in victims:
                        os.kill(pid, signal.SIGKILL)
                    _wait_gone(victims)
                    owed, held, flying = _snapshot_in_flight(gateway, held)
                finally:
                    os.kill(gateway.proc.pid, signal.SIGCONT)
                in_flight.update(flying)
                kills.append(f"after {sum(held.values())} copies: {len(owed)} owed, "
                             f"{len(flying)} in flight")
                _wait_restarted(gateway, victims)
            _wait_for("the clients to finish", lambda: not traffic.running(), 60.0)
            traffic.stop()
            _drain(gateway, context)
        finally:
            assert gateway.stop() == 0
        lost, duplicates = _verdict(gateway, [traffic], in_flight, context)
        _assert_milters_saw_every_acked_message(gateway, [traffic], context)
    assert traffic.count() == traffic.total  # the SMTP side never noticed
    print(f"\ndelivery killed ({context}): {'; '.join(kills)}; {traffic.count()} acked, "
          f"{lost} lost, {duplicates} duplicate(s), {sum(in_flight.values())} in flight")
