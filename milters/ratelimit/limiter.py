"""The rate-limit decisions, free of any milter protocol: one RateLimiter per process, one
Session per SMTP connection.

SpamGuard's idea: a source that behaves badly (rejected recipients, huge recipient lists,
connections that never send mail, a listed network) collects spam points; every
`halve_rate_every` points halve the rate and burst it is allowed; at `tempfail_at` points its
new mail gets a temporary reply so that real MTAs retry later. Points decay with a
half-life, so a source is re-admitted gradually rather than all at once.
"""
from __future__ import annotations

import logging
import threading
import time
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Callable, Sequence

from milters.core.errors import StoreUnavailable
from milters.core.eventlog import log_event
from milters.core.message import Envelope, Recipient
from milters.core.policy.document import Policy
from milters.core.policy.matching import IPAddress, network_matches
from milters.core.policy.rules import Facts
from milters.core.store import BucketResult, FallbackStore, MemoryStore, Store, Take
from milters.core.store.keys import RATELIMIT_IP_PREFIX, RATELIMIT_POINTS
from milters.core.verdict import Verdict

from .pending import Claim, PendingCounts
from .settings import Limit, RatelimitSettings

MILTER = "ratelimit"
# Buckets per store call when writing counts: one statement stays well inside SQLite's limit
# on bound variables (four per bucket) however many clients a busy moment saw.
FLUSH_BATCH = 1000
RETRY_PAUSE = 1.0  # seconds between writes while the store is unreachable
# How long counts gather before one write takes them all. Gateways sharing a store see
# each other's counts this much later: mail from one source spread over several gateways
# within this window can overshoot a burst by what they let through in it.
WRITE_WINDOW = 0.1


@lru_cache(maxsize=4096)
def ip_key(address: IPAddress) -> str:
    # Brackets keep IPv6 keys prefix-safe: 'rl:ip:[2001:db8::1]:' never prefixes '...::10]'.
    return f"{RATELIMIT_IP_PREFIX}[{address}]:"


@lru_cache(maxsize=4096)
def ip_text(address: IPAddress) -> str:
    """The canonical text of an address (ipaddress builds it anew on every str())."""
    return str(address)


@lru_cache(maxsize=4096)
def points_key(address: IPAddress) -> str:
    return ip_key(address) + RATELIMIT_POINTS


_KEY_KINDS = {"client_ip": "ip", "sender": "sender", "auth_user": "auth"}


@lru_cache(maxsize=16384)
def bucket_key(limit: Limit, value: str) -> str:
    kind = _KEY_KINDS[limit.key]
    return f"rl:{kind}:[{value.lower() if kind != 'ip' else value}]:bucket:{limit.name}"


def connection_exemption(policy: Policy, settings: RatelimitSettings,
                         address: IPAddress | None) -> str | None:
    """Why a client is exempt before anything else is known, or None."""
    if address is None:
        return "no client IP (local submission)"
    if settings.exempt_internal and network_matches(address, policy.internal_networks):
        return "internal network"
    if network_matches(address, settings.allowlist):
        return "allowlisted network"
    return None


class RateLimiter:
    """Process-wide: the store and the clock. Thread-safe (the stores are).

    Policy `on_store_failure: local` routes calls through a FallbackStore that serves from
    process memory while the shared store is unreachable; `tempfail` uses the shared store
    directly, so an outage becomes a temporary reply. Both share one connection, so a
    reloaded policy can switch between them.
    """

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.local = FallbackStore(store, MemoryStore(), self._fell_back,
                                   on_recovered=self._recovered)
        self.pending = PendingCounts()
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None

    def store_for(self, settings: RatelimitSettings) -> Store:
        """The shared store, or its fallback wrapper when the policy says `local`."""
        return self.local if settings.on_store_failure == "local" else self.store

    def flush(self, settings: RatelimitSettings) -> bool:
        """Write what is pending; False if the store failed (the counts wait for the next
        try). The writer thread calls this; tests call it directly."""
        takes = self.pending.take()
        store = self.store_for(settings)
        for start in range(0, len(takes), FLUSH_BATCH):
            batch = takes[start:start + FLUSH_BATCH]
            try:
                store.admit(None, batch, half_life=settings.points.half_life,
                            halve_every=settings.points.halve_rate_every,
                            refuse_at=None, now=self.clock())
            except StoreUnavailable as exc:
                self.pending.put_back(takes[start:])
                log_event("store_unavailable", level=logging.ERROR, milter=MILTER,
                          stage="flush", error=str(exc), action="will retry")
                return False
            self.pending.done(batch)
        return True

    def start_writer(self, settings: Callable[[], RatelimitSettings]) -> None:
        """Write counts in a background thread, WRITE_WINDOW after the first one waits:
        one store write then carries every count of that window (group commit)."""
        def run() -> None:
            while not self._stopping.is_set():
                if not self.pending.wait(timeout=1.0):
                    continue
                self._stopping.wait(WRITE_WINDOW)
                if not self.flush(settings()):
                    self._stopping.wait(RETRY_PAUSE)  # the store is down: do not spin
        self._writer = threading.Thread(target=run, name="ratelimit-writer", daemon=True)
        self._writer.start()

    def stop_writer(self, settings: RatelimitSettings) -> None:
        """Stop the writer and write what is left (at exit: counted mail outlives us)."""
        self._stopping.set()
        self.pending.wake()
        if self._writer is not None:
            self._writer.join(timeout=5.0)
        self.flush(settings)

    @staticmethod
    def _fell_back(reason: str) -> None:
        log_event("store_unavailable", level=logging.ERROR, milter=MILTER, error=reason,
                  action="counting in process memory until it is back")

    @staticmethod
    def _recovered() -> None:
        log_event("store_recovered", milter=MILTER)

    def session(self, policy: Policy) -> "Session":
        return Session(self, policy, policy.sections[MILTER])


@dataclass
class Session:
    """One SMTP connection. The policy snapshot is fixed for the connection's lifetime."""

    limiter: RateLimiter
    policy: Policy
    settings: RatelimitSettings
    exempt_reason: str | None = None
    saw_mail: bool = False
    refused: bool = False
    connection_verdict: Verdict | None = None  # a connection limit's verdict, due at MAIL
    message_exempt: bool = False
    accepted_rcpts: int = 0
    flagged_too_many: bool = False
    slowdown: float = 1.0
    # Recipient buckets as read at MAIL FROM (by bucket key).
    peeks: dict[str, tuple[Limit, BucketResult]] = field(default_factory=dict)

    # -- helpers -------------------------------------------------------------------------
    @property
    def _store(self) -> Store:
        return self.limiter.store_for(self.settings)

    def _points(self, address: IPAddress, add: float = 0.0, signal: str | None = None,
                queue_id: str | None = None) -> float:
        points = self._store.points_add(points_key(address), add,
                                        half_life=self.settings.points.half_life,
                                        now=self.limiter.clock())
        if add:
            log_event("points", milter=MILTER, queue_id=queue_id, ip=str(address), signal=signal,
                      added=add, points=points)
        return points

    def _key_value(self, limit: Limit, env: Envelope) -> str | None:
        if limit.key == "client_ip":
            address = env.client_address
            return ip_text(address) if address is not None else None
        if limit.key == "sender":
            return env.mail_from or None  # the null sender is limited by IP only
        return env.auth_user

    def _applicable(self, limits: Sequence[Limit], env: Envelope) -> list[tuple[Limit, str]]:
        return [(limit, bucket_key(limit, value)) for limit in limits
                if (value := self._key_value(limit, env)) is not None]

    def _blocked(self, points: float) -> Verdict:
        reason = f"{points:.1f} spam points (limit {self.settings.points.tempfail_at:g})"
        reply = self.settings.blocked_reply
        return (Verdict.tempfail(reply, reason) if reply.is_temporary
                else Verdict.reject(reply, reason))

    def _over_limit(self, limit: Limit, key: str, used: float, capacity: float,
                    rate: float) -> Verdict:
        wait = (used + 1 - capacity) / rate if rate > 0 else float("inf")
        return Verdict.tempfail(self.settings.reply, reason=(
            f"limit {limit.name} for {key}: {used:.1f} of {capacity:.0f} used, "
            f"retry in {wait:.0f}s"))

    def _count_connection(self, limits: Sequence[Limit], env: Envelope) -> Verdict:
        """Count this connection in every applicable bucket at once (one atomic store call),
        at the speed the client's points allow. Connect has no reply, so the MTA does not
        wait for this write."""
        assert env.client_address is not None
        pts = self.settings.points
        counted = self._applicable(limits, env)
        admission = self._store.admit(points_key(env.client_address),
                                      [Take(key, limit.rate, limit.burst) for limit, key in counted],
                                      half_life=pts.half_life, halve_every=pts.halve_rate_every,
                                      refuse_at=None, now=self.limiter.clock())
        denied = admission.first_denied()
        if denied is None:
            return Verdict.cont()
        limit, key = counted[denied]
        result = admission.results[denied]
        return self._over_limit(limit, key, result.level, result.capacity,
                                limit.rate * admission.slowdown)

    def _admit_message(self, limits: Sequence[Limit], peek: Sequence[Limit],
                       env: Envelope) -> Verdict:
        """One store call for the points, every message bucket and the recipient buckets'
        levels. Where the store prefers it (SQLite), that call only reads and the message
        is checked and counted in process (PendingCounts), written by the writer thread
        within WRITE_WINDOW; elsewhere (memory, Redis) it counts atomically right here."""
        assert env.client_address is not None
        pts = self.settings.points
        counted = self._applicable(limits, env)
        peeked = self._applicable(peek, env)
        behind = self._store.prefers_write_behind
        takes = ([Take(key, limit.rate, limit.burst, 0.0 if behind else 1.0)
                  for limit, key in counted]
                 + [Take(key, limit.rate, limit.burst, 0.0) for limit, key in peeked])
        admission = self._store.admit(points_key(env.client_address), takes,
                                      half_life=pts.half_life, halve_every=pts.halve_rate_every,
                                      refuse_at=pts.tempfail_at, now=self.limiter.clock())
        if admission.refused:
            return self._blocked(admission.points)
        self.slowdown = slow = admission.slowdown
        if behind:
            claims = [Claim(key, result.level, result.capacity, limit.rate * slow)
                      for (limit, key), result in zip(counted, admission.results)]
            denied = self.limiter.pending.reserve(claims)
            if denied is not None:
                index, used = denied
                return self._over_limit(counted[index][0], claims[index].key, used,
                                        claims[index].capacity, claims[index].rate)
        else:
            index = admission.first_denied()
            if index is not None:
                limit, key = counted[index]
                result = admission.results[index]
                return self._over_limit(limit, key, result.level, result.capacity,
                                        limit.rate * slow)
        self.peeks = {key: (limit, result) for (limit, key), result
                      in zip(peeked, admission.results[len(counted):])}
        return Verdict.cont()

    def _check_recipient(self) -> Verdict:
        """Recipient limits without a store call: the levels read at MAIL FROM plus what this
        process let through since and has not written yet."""
        items = list(self.peeks.items())
        claims = [Claim(key, peek.level, peek.capacity, limit.rate * self.slowdown)
                  for key, (limit, peek) in items]
        denied = self.limiter.pending.reserve(claims)
        if denied is None:
            return Verdict.cont()
        index, used = denied
        return self._over_limit(items[index][1][0], claims[index].key, used,
                                claims[index].capacity, claims[index].rate)

    def _store_failed(self, stage: str, exc: StoreUnavailable, env: Envelope) -> Verdict:
        log_event("store_unavailable", level=logging.ERROR, milter=MILTER, stage=stage,
                  error=str(exc), action="tempfail", ip=env.client_ip, queue_id=env.queue_id)
        self.refused = True
        return Verdict.tempfail(self.settings.store_failure_reply, reason="state store unreachable")

    # -- stages --------------------------------------------------------------------------
    def on_connect(self, env: Envelope) -> Verdict:
        address = env.client_address
        self.exempt_reason = connection_exemption(self.policy, self.settings, address)
        if self.exempt_reason:
            return Verdict.cont(self.exempt_reason)
        assert address is not None
        try:
            bad = self.settings.points.bad_networks
            if bad.points and network_matches(address, bad.networks):
                self._points(address, bad.points, "bad_network")
            limits = self.settings.limits_per("connection")
            if limits:
                # Counted now, enforced at MAIL FROM: only then can a rule that names the
                # sender exempt this client, and "exempt" must mean exempt from every limit.
                self.connection_verdict = self._count_connection(limits, env)
        except StoreUnavailable as exc:
            # Connect has no reply (the MTA does not wait for it): log it; MAIL FROM asks the
            # store again and answers by policy.
            self._store_failed("connect", exc, env)
        return Verdict.cont()

    def on_mail(self, env: Envelope) -> Verdict:
        self.saw_mail = True
        self.accepted_rcpts, self.flagged_too_many, self.message_exempt = 0, False, False
        if self.exempt_reason or env.client_address is None:
            return Verdict.cont(self.exempt_reason or "")
        facts = Facts.from_envelope(env, self.policy.internal_networks, with_recipients=False)
        decision = self.policy.decide(MILTER, facts)
        if decision.action == "exempt":
            self.message_exempt = True
            return Verdict.cont(f"exempt by rule {decision.rule_label}")
        over_connections = (self.connection_verdict is not None
                             and self.connection_verdict.ends_transaction)
        # A message refused for too many connections must not be counted as a message.
        limits = () if over_connections else self.settings.limits_per("message")
        recipient_limits = self.settings.limits_per("recipient")
        self.peeks = {}
        try:
            # One read: points, message buckets, and the recipient buckets' levels.
            verdict = self._admit_message(limits, recipient_limits, env)
        except StoreUnavailable as exc:
            return self._store_failed("mail", exc, env)
        if over_connections and not verdict.ends_transaction:
            return self.connection_verdict  # type: ignore[return-value]
        return verdict

    def on_rcpt(self, env: Envelope, rcpt: Recipient) -> Verdict:
        if self.exempt_reason or self.message_exempt or env.client_address is None:
            return Verdict.cont()
        points = self.settings.points
        try:
            if rcpt.rejected_by_mta:
                if points.rejected_recipient:
                    self._points(env.client_address, points.rejected_recipient,
                                 "rejected_recipient", env.queue_id)
                return Verdict.cont("the MTA rejected it already")
            self.accepted_rcpts += 1
            if (self.accepted_rcpts > points.too_many_recipients.over
                    and not self.flagged_too_many and points.too_many_recipients.points):
                self.flagged_too_many = True
                self._points(env.client_address, points.too_many_recipients.points,
                             "too_many_recipients", env.queue_id)
            return self._check_recipient()
        except StoreUnavailable as exc:
            return self._store_failed("rcpt", exc, env)

    def on_auth_results(self, env: Envelope, results: list[tuple[str, str]]) -> None:
        """Points for the auth failures the policy names, each outcome once per message
        (three failing DKIM signatures are one dkim=fail)."""
        table = self.settings.points.auth_results
        if not table or self.exempt_reason or env.client_address is None:
            return
        try:
            for method, result in dict.fromkeys(results):
                points = table.get(f"{method}={result}")
                if points:
                    self._points(env.client_address, points, f"{method}={result}",
                                 env.queue_id)
        except StoreUnavailable as exc:
            log_event("store_unavailable", level=logging.ERROR, milter=MILTER, stage="eom",
                      error=str(exc), ip=env.client_ip)

    def on_close(self, env: Envelope) -> None:
        idle = self.settings.points.connection_without_mail
        try:
            if self.saw_mail or self.refused or self.exempt_reason or not idle:
                return
            if env.client_address is None:
                return
            self._points(env.client_address, idle, "connection_without_mail")
        except StoreUnavailable as exc:
            log_event("store_unavailable", level=logging.ERROR, milter=MILTER, stage="close",
                      error=str(exc), ip=env.client_ip)
