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
from milters.core.verdict import Verdict

from .pending import PendingCounts
from .settings import Limit, RatelimitSettings

MILTER = "ratelimit"


@lru_cache(maxsize=4096)
def ip_key(address: IPAddress) -> str:
    # Brackets keep IPv6 keys prefix-safe: 'rl:ip:[2001:db8::1]:' never prefixes '...::10]'.
    return f"rl:ip:[{address}]:"


@lru_cache(maxsize=4096)
def points_key(address: IPAddress) -> str:
    return ip_key(address) + "points"


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

    def store_for(self, settings: RatelimitSettings) -> Store:
        """The shared store, or its fallback wrapper when the policy says `local`."""
        return self.local if settings.on_store_failure == "local" else self.store

    def flush(self, settings: RatelimitSettings) -> None:
        """Write what is pending (the milter calls this every second and at exit)."""
        takes = self.pending.take()
        if not takes:
            return
        try:
            self.store_for(settings).admit(None, takes, half_life=settings.points.half_life,
                                           halve_every=settings.points.halve_rate_every,
                                           refuse_at=None, now=self.clock())
        except StoreUnavailable as exc:
            self.pending.put_back(takes)
            log_event("store_unavailable", level=logging.ERROR, milter=MILTER, stage="flush",
                      error=str(exc), action="will retry")

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
    # Recipient buckets as read at MAIL FROM, and recipients counted since (by bucket key).
    peeks: dict[str, tuple[Limit, BucketResult]] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    pending_rates: dict[str, float] = field(default_factory=dict)

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
            return str(env.client_address) if env.client_address else None
        if limit.key == "sender":
            return env.mail_from or None  # the null sender is limited by IP only
        return env.auth_user

    def _applicable(self, limits: Sequence[Limit], env: Envelope) -> list[tuple[Limit, str]]:
        return [(limit, bucket_key(limit, value)) for limit in limits
                if (value := self._key_value(limit, env)) is not None]

    def _admit(self, limits: Sequence[Limit], env: Envelope, refuse: bool = False,
               peek: Sequence[Limit] = ()) -> Verdict:
        """Count this event in every applicable bucket at once (one atomic store call, one
        round trip), at the speed the client's points allow; with `refuse`, a client at or
        over `tempfail_at` points gets the blocked reply and nothing is counted. Buckets in
        `peek` are only read, for the recipient checks of this transaction."""
        assert env.client_address is not None
        pts = self.settings.points
        counted = self._applicable(limits, env)
        peeked = self._applicable(peek, env)
        takes = ([Take(key, limit.rate, limit.burst) for limit, key in counted]
                 + [Take(key, limit.rate, limit.burst, 0.0) for limit, key in peeked])
        # Pending recipient counts are not written here, on the MTA's critical path: the
        # milter's one-second tick flushes them in one batch (RateLimiter.flush).
        admission = self._store.admit(points_key(env.client_address), takes,
                                      half_life=pts.half_life, halve_every=pts.halve_rate_every,
                                      refuse_at=pts.tempfail_at if refuse else None,
                                      now=self.limiter.clock())
        if admission.refused:
            reason = f"{admission.points:.1f} spam points (limit {pts.tempfail_at:g})"
            reply = self.settings.blocked_reply
            return (Verdict.tempfail(reply, reason) if reply.is_temporary
                    else Verdict.reject(reply, reason))
        denied = admission.first_denied()
        if denied is not None:
            limit, key = counted[denied]
            result = admission.results[denied]
            return Verdict.tempfail(self.settings.reply, reason=(
                f"limit {limit.name} for {key}: {result.level:.1f} of "
                f"{result.capacity:.0f} used, retry in {result.retry_after:.0f}s"))
        self.slowdown = admission.slowdown
        self.peeks = {key: (limit, result) for (limit, key), result
                      in zip(peeked, admission.results[len(counted):len(takes)])}
        return Verdict.cont()

    def _check_recipient(self) -> Verdict:
        """Recipient limits without a store round trip: the levels read at MAIL FROM plus
        the recipients this process has let through since and not yet written. They are
        written within a second (off the MTA's critical path), so connections from one source
        through several gateways can overshoot a recipient burst by what they add in that
        second."""
        for key, (limit, peek) in self.peeks.items():
            # Other sessions of this process may hold counts for this bucket not yet written.
            used = peek.level + self.limiter.pending.count(key) + self.pending.get(key, 0) + 1
            if used > peek.capacity:
                wait = (used - peek.capacity) / (limit.rate * self.slowdown)
                return Verdict.tempfail(self.settings.reply, reason=(
                    f"limit {limit.name} for {key}: {used - 1:.1f} of {peek.capacity:.0f} "
                    f"used, retry in {wait:.0f}s"))
        for key, (limit, _) in self.peeks.items():
            self.pending[key] = self.pending.get(key, 0) + 1
            self.pending_rates[key] = limit.rate * self.slowdown
        return Verdict.cont()

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
                self.connection_verdict = self._admit(limits, env)
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
            # One round trip: points, message buckets, and the recipient buckets' levels.
            verdict = self._admit(limits, env, refuse=True, peek=recipient_limits)
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

    def on_close(self, env: Envelope) -> None:
        idle = self.settings.points.connection_without_mail
        if self.pending:
            self.limiter.pending.add({key: (self.pending_rates[key], float(count))
                                      for key, count in self.pending.items()})
            self.pending = {}
        try:
            if self.saw_mail or self.refused or self.exempt_reason or not idle:
                return
            if env.client_address is None:
                return
            self._points(env.client_address, idle, "connection_without_mail")
        except StoreUnavailable as exc:
            log_event("store_unavailable", level=logging.ERROR, milter=MILTER, stage="close",
                      error=str(exc), ip=env.client_ip)
