"""The rate-limit decisions with a clock the tests control: bursts, draining, spam points,
gradual re-admission, exemptions and store failures."""
from __future__ import annotations

import ipaddress
import time

import pytest

from milters.core.errors import StoreUnavailable
from milters.core.message import Envelope, Recipient
from milters.core.store import MemoryStore
from milters.core.store.sqlite import SqliteStore
from milters.core.verdict import Action
from milters.ratelimit.limiter import RateLimiter, points_key
from tests.conftest import Clock, make_policy

BASE = """
ratelimit:
  limits:
    - {name: per-ip, key: client_ip, per: message, rate: 6/min, burst: 3}
  points:
    half_life: 10m
    halve_rate_every: 10
    tempfail_at: 30
    rejected_recipient: 4
    too_many_recipients: {over: 3, points: 7}
    connection_without_mail: 2
    bad_networks: {points: 15, networks: [203.0.113.0/24]}
"""


def send(limiter: RateLimiter, policy, ip: str = "198.51.100.7", sender: str = "a@bulk.example",
         rcpts=("u@example.jp",), rejected=(), write=True):  # type: ignore[no-untyped-def]
    """One SMTP session with one message; returns the first verdict that ended it, or the last.
    With `write`, what was counted in process is then written, as the milter's writer
    thread does within moments."""
    session = limiter.session(policy)
    env = Envelope(client_ip=ip)
    verdict = session.on_connect(env)
    if not verdict.ends_transaction:
        env.mail_from = sender
        verdict = session.on_mail(env)
    if not verdict.ends_transaction:
        for address in list(rcpts) + list(rejected):
            rcpt = Recipient(address, rejected_by_mta=address in rejected)
            env.recipients.append(rcpt)
            verdict = session.on_rcpt(env, rcpt)
            if verdict.ends_transaction:
                break
    session.on_close(env)
    if write:
        assert limiter.flush(policy.sections["ratelimit"])
    return verdict


@pytest.fixture
def limiter(clock: Clock) -> RateLimiter:
    return RateLimiter(MemoryStore(), clock=clock)


@pytest.fixture
def sqlite_limiter(clock: Clock, tmp_path) -> RateLimiter:  # type: ignore[no-untyped-def]
    """SQLite prefers write-behind: MAIL FROM only reads, counts are written later."""
    return RateLimiter(SqliteStore(str(tmp_path / "state.db")), clock=clock)


def test_burst_passes_then_tempfail_with_policy_reply(limiter: RateLimiter) -> None:
    policy = make_policy(BASE + '  reply: "451 4.7.1 Slow down please"\n')
    assert [send(limiter, policy).action for _ in range(3)] == [Action.CONTINUE] * 3
    verdict = send(limiter, policy)
    assert verdict.action is Action.TEMPFAIL
    assert str(verdict.reply) == "451 4.7.1 Slow down please"
    assert "per-ip" in verdict.reason


def test_bucket_drains_and_mail_passes_again(limiter: RateLimiter, clock: Clock) -> None:
    policy = make_policy(BASE)
    for _ in range(3):
        send(limiter, policy)
    assert send(limiter, policy).action is Action.TEMPFAIL
    clock.advance(9)  # 6/min drains one message every 10 s
    assert send(limiter, policy).action is Action.TEMPFAIL
    clock.advance(1)
    assert send(limiter, policy).action is Action.CONTINUE
    assert send(limiter, policy).action is Action.TEMPFAIL


def test_other_ip_has_its_own_bucket(limiter: RateLimiter) -> None:
    policy = make_policy(BASE)
    for _ in range(4):
        send(limiter, policy, ip="198.51.100.7")
    assert send(limiter, policy, ip="198.51.100.8").action is Action.CONTINUE


def test_rejected_recipients_slow_a_source_down_then_it_recovers(limiter: RateLimiter,
                                                                clock: Clock) -> None:
    policy = make_policy(BASE)
    ip = "198.51.100.9"
    # Five rejected recipients: 20 points, so rates run at a quarter: burst 3 -> 1 (floor 1).
    send(limiter, policy, ip=ip, rejected=[f"nobody{i}@example.jp" for i in range(5)])
    points = limiter.store.points_add(points_key(ipaddress.ip_address(ip)), 0,
                                      half_life=600, now=clock())
    assert points == pytest.approx(20)
    clock.advance(3600)  # let the bucket drain completely; points decay too (6 half-lives)
    # After an hour the points are 20 / 64 = 0.3: the full burst of 3 is back.
    assert [send(limiter, policy, ip=ip).action for _ in range(4)] == \
        [Action.CONTINUE] * 3 + [Action.TEMPFAIL]


def test_points_shrink_the_burst_before_decay(limiter: RateLimiter, clock: Clock) -> None:
    policy = make_policy(BASE)
    ip = "198.51.100.10"
    send(limiter, policy, ip=ip, rejected=[f"x{i}@example.jp" for i in range(5)])  # 20 points
    clock.advance(60)  # drains the first message; points barely decay
    results = [send(limiter, policy, ip=ip).action for _ in range(2)]
    assert results == [Action.CONTINUE, Action.TEMPFAIL]  # burst 3 * 0.25 -> 1


def test_above_threshold_new_mail_is_tempfailed_and_readmitted_gradually(
        limiter: RateLimiter, clock: Clock) -> None:
    policy = make_policy(BASE)
    ip = "198.51.100.11"
    send(limiter, policy, ip=ip, rejected=[f"x{i}@example.jp" for i in range(8)])  # 32 points
    verdict = send(limiter, policy, ip=ip)
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and verdict.reply.code == 451
    assert "spam points" in verdict.reason
    clock.advance(600)  # one half-life: 16 points, rate at 1/3, one message fits
    assert send(limiter, policy, ip=ip).action is Action.CONTINUE
    assert send(limiter, policy, ip=ip).action is Action.TEMPFAIL


def test_too_many_recipients_adds_points_once(limiter: RateLimiter, clock: Clock) -> None:
    policy = make_policy(BASE)
    ip = "198.51.100.12"
    send(limiter, policy, ip=ip, rcpts=[f"u{i}@example.jp" for i in range(10)])
    key = points_key(ipaddress.ip_address(ip))
    assert limiter.store.points_add(key, 0, half_life=600, now=clock()) == pytest.approx(7)


def test_connections_without_mail_add_points(limiter: RateLimiter, clock: Clock) -> None:
    policy = make_policy(BASE)
    for _ in range(3):
        session = limiter.session(policy)
        env = Envelope(client_ip="198.51.100.13")
        session.on_connect(env)
        session.on_close(env)
    key = points_key(ipaddress.ip_address("198.51.100.13"))
    assert limiter.store.points_add(key, 0, half_life=600, now=clock()) == pytest.approx(6)


def test_bad_network_collects_points_per_connection(limiter: RateLimiter) -> None:
    policy = make_policy(BASE)
    assert send(limiter, policy, ip="203.0.113.5").action is Action.CONTINUE  # 15 points
    assert send(limiter, policy, ip="203.0.113.5").action is Action.TEMPFAIL  # 30: blocked


@pytest.mark.parametrize("extra, ip, sender", [
    ("", "127.0.0.1", "a@x.example"),  # internal networks are exempt by default
    ("  allowlist: [198.51.100.0/24]\n", "198.51.100.20", "a@x.example"),
    ("rules:\n  - name: partner\n    when: {sender: ['@partner.example']}\n"
     "    then: {ratelimit: exempt}\n", "198.51.100.21", "sales@partner.example"),
])
def test_exempt_sources_are_never_limited(limiter: RateLimiter, extra: str, ip: str,
                                          sender: str) -> None:
    policy = make_policy(BASE + extra)
    verdicts = [send(limiter, policy, ip=ip, sender=sender).action for _ in range(20)]
    assert verdicts == [Action.CONTINUE] * 20


def test_internal_networks_are_limited_when_exemption_is_off(limiter: RateLimiter) -> None:
    policy = make_policy(BASE + "  exempt_internal: false\n")
    verdicts = [send(limiter, policy, ip="127.0.0.1").action for _ in range(4)]
    assert verdicts[-1] is Action.TEMPFAIL


def test_sender_limit_spans_ips_and_null_sender_is_skipped(limiter: RateLimiter) -> None:
    policy = make_policy("""
        ratelimit:
          limits:
            - {name: per-sender, key: sender, per: message, rate: 1/hour, burst: 2}
        """)
    ips = ["198.51.100.30", "198.51.100.31", "198.51.100.32"]
    verdicts = [send(limiter, policy, ip=ip, sender="Boss@Example.JP").action for ip in ips]
    assert verdicts == [Action.CONTINUE, Action.CONTINUE, Action.TEMPFAIL]
    assert all(send(limiter, policy, sender="").action is Action.CONTINUE for _ in range(5))


def test_recipient_limit_tempfails_the_recipient(limiter: RateLimiter) -> None:
    policy = make_policy("""
        ratelimit:
          limits:
            - {name: rcpts, key: client_ip, per: recipient, rate: 1/hour, burst: 2}
        """)
    verdict = send(limiter, policy, rcpts=["a@example.jp", "b@example.jp", "c@example.jp"])
    assert verdict.action is Action.TEMPFAIL and "rcpts" in verdict.reason


def test_connection_limit_is_enforced_at_mail_so_rules_can_exempt(limiter: RateLimiter) -> None:
    policy = make_policy("""
        ratelimit:
          limits:
            - {name: conns, key: client_ip, per: connection, rate: 1/hour, burst: 1}
        rules:
          - name: partner
            when: {sender: ['@partner.example']}
            then: {ratelimit: exempt}
        """)
    assert send(limiter, policy).action is Action.CONTINUE
    session = limiter.session(policy)
    env = Envelope(client_ip="198.51.100.7")
    assert session.on_connect(env).action is Action.CONTINUE  # counted, not yet enforced
    env.mail_from = "a@stranger.example"
    verdict = session.on_mail(env)
    assert verdict.action is Action.TEMPFAIL and "conns" in verdict.reason
    # The same over-limit client sending as the exempt partner passes: exempt means exempt.
    assert send(limiter, policy, sender="orders@partner.example").action is Action.CONTINUE


def test_a_trace_of_points_does_not_cost_a_whole_message(limiter: RateLimiter,
                                                         clock: Clock) -> None:
    policy = make_policy(BASE)
    ip = ipaddress.ip_address("198.51.100.40")
    limiter.store.points_add(points_key(ip), 0.5, half_life=600, now=clock())
    verdicts = [send(limiter, policy, ip=str(ip)).action for _ in range(4)]
    assert verdicts == [Action.CONTINUE] * 3 + [Action.TEMPFAIL]


class DeadStore(MemoryStore):
    def bucket_take(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise StoreUnavailable("redis 127.0.0.1:1 refused the connection")

    def points_add(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise StoreUnavailable("redis 127.0.0.1:1 refused the connection")

    def admit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise StoreUnavailable("redis 127.0.0.1:1 refused the connection")


class FlakyStore(MemoryStore):
    """A memory store whose writes fail while `down` (reads still work), written behind
    like SQLite."""

    down = False
    prefers_write_behind = True

    def admit(self, points_key, takes, **kwargs):  # type: ignore[no-untyped-def]
        if self.down and any(take.cost for take in takes):
            raise StoreUnavailable("redis 127.0.0.1:1 refused the connection")
        return super().admit(points_key, takes, **kwargs)


def test_store_down_tempfails_by_default(clock: Clock) -> None:
    policy = make_policy(BASE + '  store_failure_reply: "451 4.3.0 State store down"\n')
    verdict = send(RateLimiter(DeadStore(), clock=clock), policy)
    assert verdict.action is Action.TEMPFAIL
    assert str(verdict.reply) == "451 4.3.0 State store down"


def test_store_down_falls_back_to_local_counting(clock: Clock) -> None:
    policy = make_policy(BASE + "  on_store_failure: local\n")
    limiter = RateLimiter(DeadStore(), clock=clock)
    verdicts = [send(limiter, policy).action for _ in range(4)]
    assert verdicts == [Action.CONTINUE] * 3 + [Action.TEMPFAIL]  # still limited, in memory


def test_auth_user_limit_follows_the_account_across_ips(limiter: RateLimiter) -> None:
    """A stolen password used from many IPs is still one account."""
    policy = make_policy("""
        ratelimit:
          limits:
            - {name: per-user, key: auth_user, per: message, rate: 1/hour, burst: 2}
        """)

    def as_user(ip: str, user: str | None) -> Action:
        session = limiter.session(policy)
        env = Envelope(client_ip=ip)
        session.on_connect(env)
        env.mail_from, env.auth_user = "taro@example.jp", user
        return session.on_mail(env).action

    assert [as_user(f"198.51.100.{i}", "taro") for i in range(3)] == \
        [Action.CONTINUE, Action.CONTINUE, Action.TEMPFAIL]
    assert as_user("198.51.100.9", "hanako") is Action.CONTINUE
    assert all(as_user("198.51.100.10", None) is Action.CONTINUE for _ in range(5))


def test_recipients_are_counted_across_connections(limiter: RateLimiter, clock: Clock) -> None:
    """Recipients are checked locally during a transaction and written later: the next
    connection sees them all the same."""
    policy = make_policy("""
        ratelimit:
          limits:
            - {name: rcpts, key: client_ip, per: recipient, rate: 1/hour, burst: 3}
        """)
    assert send(limiter, policy, rcpts=["a@example.jp", "b@example.jp"],
                write=False).action is Action.CONTINUE
    verdict = send(limiter, policy, rcpts=["c@example.jp", "d@example.jp"], write=False)
    assert verdict.action is Action.TEMPFAIL and "rcpts" in verdict.reason
    key = "rl:ip:[198.51.100.7]:bucket:rcpts"
    assert limiter.store.records(key, now=clock()) == []  # not written yet: no round trip
    limiter.flush(policy.sections["ratelimit"])  # what the milter does every second
    level = limiter.store.bucket_take(key, cost=0, rate=1 / 3600, capacity=100, now=clock())
    assert level.level == pytest.approx(3)  # a, b and c were let through and recorded


def test_sqlite_counts_are_written_behind_not_on_the_critical_path(
        sqlite_limiter: RateLimiter, clock: Clock) -> None:
    limiter = sqlite_limiter
    policy = make_policy("""
        ratelimit:
          limits:
            - {name: rcpts, key: client_ip, per: recipient, rate: 1/hour, burst: 10}
            - {name: msgs, key: client_ip, per: message, rate: 1/hour, burst: 10}
        """)
    send(limiter, policy, ip="198.51.100.50", rcpts=["a@example.jp", "b@example.jp"],
         write=False)
    send(limiter, policy, ip="198.51.100.51", write=False)
    assert limiter.store.records("rl:", now=clock()) == []  # MAIL FROM and RCPT TO only read
    limiter.flush(policy.sections["ratelimit"])
    records = {r.key: r.value for r in limiter.store.records("rl:ip:", now=clock())}
    assert records["rl:ip:[198.51.100.50]:bucket:rcpts"] == pytest.approx(2)
    assert records["rl:ip:[198.51.100.50]:bucket:msgs"] == pytest.approx(1)
    assert records["rl:ip:[198.51.100.51]:bucket:msgs"] == pytest.approx(1)


def test_messages_counted_in_process_are_limited_before_they_are_written(
        sqlite_limiter: RateLimiter, clock: Clock) -> None:
    limiter = sqlite_limiter
    """Messages of concurrent connections are counted in process until written; the burst
    holds all the same."""
    policy = make_policy(BASE)
    verdicts = [send(limiter, policy, ip="198.51.100.60", write=False).action for _ in range(4)]
    assert verdicts == [Action.CONTINUE] * 3 + [Action.TEMPFAIL]
    assert limiter.store.records("rl:", now=clock()) == []
    limiter.flush(policy.sections["ratelimit"])
    assert send(limiter, policy, ip="198.51.100.60").action is Action.TEMPFAIL
    clock.advance(10)  # 6/min: one message drained from the written bucket
    assert send(limiter, policy, ip="198.51.100.60").action is Action.CONTINUE


def test_writer_thread_writes_counts_at_once_and_retries_after_store_failure(
        clock: Clock) -> None:
    policy = make_policy(BASE)
    settings = policy.sections["ratelimit"]
    store = FlakyStore()
    limiter = RateLimiter(store, clock=clock)
    limiter.start_writer(lambda: settings)
    try:
        store.down = True
        assert send(limiter, policy, ip="198.51.100.70", write=False).action is Action.CONTINUE
        time.sleep(0.3)
        assert store.records("rl:", now=clock()) == []  # held, not lost
        assert limiter.pending.count("rl:ip:[198.51.100.70]:bucket:per-ip") == 1
        store.down = False
        deadline = time.monotonic() + 5
        while not store.records("rl:", now=clock()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [r.value for r in store.records("rl:", now=clock())] == [1.0]
        assert limiter.pending.count("rl:ip:[198.51.100.70]:bucket:per-ip") == 0
    finally:
        limiter.stop_writer(settings)


def test_memory_and_redis_like_stores_count_messages_exactly_at_mail_from(
        limiter: RateLimiter, clock: Clock) -> None:
    """Where counting costs what reading costs, a message is in the store the moment
    MAIL FROM is answered: gateways sharing it never overshoot."""
    policy = make_policy(BASE)
    assert send(limiter, policy, ip="198.51.100.80", write=False).action is Action.CONTINUE
    [record] = limiter.store.records("rl:ip:[198.51.100.80]:bucket:", now=clock())
    assert record.value == pytest.approx(1)


def test_show_drains_buckets_at_the_points_speed_and_hides_empty_ones() -> None:
    """`ratelimit show` lists what still counts: a bucket drains at the speed its client's
    points allow, and one that has drained is not listed (the store keeps it a while)."""
    from milters.core.store import Take
    from milters.ratelimit import admin
    settings = make_policy("ratelimit:\n  limits: [{name: m, rate: 1/min, burst: 5},"
                           " {name: n, rate: 1/min, burst: 5}]\n").sections["ratelimit"]
    store, now = MemoryStore(), time.time()
    ip = "198.51.100.9"
    slowed, drained = f"rl:ip:[{ip}]:bucket:m", f"rl:ip:[{ip}]:bucket:n"
    store.admit(None, [Take(slowed, 1 / 60, 5, cost=4)], half_life=3600.0, halve_every=10.0,
                refuse_at=None, now=now - 120)
    store.admit(None, [Take(drained, 1 / 60, 5, cost=1)], half_life=3600.0, halve_every=10.0,
                refuse_at=None, now=now - 600)  # empty after 240 s even at a quarter
    assert len(store.records(f"rl:ip:[{ip}]:", now=now)) == 2
    store.points_add(points_key(ipaddress.ip_address(ip)), 20, half_life=3600.0, now=now)
    lines = admin.show(store, settings, ip)
    # Points slow it to about a quarter: 4 - 120 s x 1/min x 0.25 ~ 3.5, not 4 - 2 = 2.0.
    assert [line.split("; ")[0] for line in lines] == [
        f"ip {ip}  m       3.5 of 5 used",
        f"ip {ip}  points  20.0 (limits at 25% speed)"]
