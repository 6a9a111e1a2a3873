"""The `ratelimit:` section of a policy, its rule action and its test expectations."""
from __future__ import annotations

from dataclasses import dataclass, field

from milters.core.policy.matching import NetworkPattern
from milters.core.policy.schema import (Bool, Duration, Field, ListOf, MapOf, Network, Number,
                                        PerSecond, Rate, Reply, Str, Struct)
from milters.core.store.base import slowdown_factor
from milters.core.verdict import SmtpReply

KEYS = ("client_ip", "sender", "auth_user")
UNITS = ("connection", "message", "recipient")
ACTIONS = ("enforce", "exempt")


@dataclass(frozen=True)
class Limit:
    """A leaky bucket: `burst` events at once, refilled at `rate` events per second."""

    name: str
    key: str  # what is counted together: client_ip, sender or auth_user
    per: str  # what one event is: a connection, a message or a recipient
    rate: float
    burst: int


@dataclass(frozen=True)
class TooManyRecipients:
    over: int = 50
    points: float = 5.0


@dataclass(frozen=True)
class BadNetworks:
    points: float = 20.0
    networks: tuple[NetworkPattern, ...] = ()


@dataclass(frozen=True)
class PointsSettings:
    half_life: float = 3600.0
    halve_rate_every: float = 10.0
    tempfail_at: float = 50.0
    rejected_recipient: float = 2.0
    too_many_recipients: TooManyRecipients = field(default_factory=TooManyRecipients)
    connection_without_mail: float = 1.0
    bad_networks: BadNetworks = field(default_factory=BadNetworks)
    # "method=result" from our Authentication-Results header (e.g. "dmarc=fail") -> points.
    auth_results: dict[str, float] = field(default_factory=dict)

    def slowdown(self, points: float) -> float:
        """The share of the normal rate a source with these points gets (1.0 = full speed)."""
        return slowdown_factor(points, self.halve_rate_every)


DEFAULT_LIMITS = (
    Limit("client-messages", "client_ip", "message", PerSecond(30 / 60, "30/min"), 30),
    Limit("client-recipients", "client_ip", "recipient", PerSecond(200 / 3600, "200/hour"), 100),
    Limit("sender-messages", "sender", "message", PerSecond(100 / 3600, "100/hour"), 50),
)
DEFAULT_REPLY = SmtpReply(451, "4.7.1", "Too much mail from your address; slow down and try again later")
DEFAULT_BLOCKED = SmtpReply(451, "4.7.1", "Your address sent too much unwanted mail; try again later")
DEFAULT_STORE_FAILURE = SmtpReply(451, "4.3.0", "Temporary local problem, please try again later")


@dataclass(frozen=True)
class RatelimitSettings:
    exempt_internal: bool = True
    allowlist: tuple[NetworkPattern, ...] = ()
    limits: tuple[Limit, ...] = DEFAULT_LIMITS
    reply: SmtpReply = DEFAULT_REPLY
    blocked_reply: SmtpReply = DEFAULT_BLOCKED
    points: PointsSettings = field(default_factory=PointsSettings)
    on_store_failure: str = "tempfail"
    store_failure_reply: SmtpReply = DEFAULT_STORE_FAILURE

    # The limits grouped by what one event is, worked out once (every MAIL FROM asks).
    _by_unit: dict[str, tuple[Limit, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_unit", {
            unit: tuple(limit for limit in self.limits if limit.per == unit) for unit in UNITS})

    def limit(self, name: str) -> Limit | None:
        return next((limit for limit in self.limits if limit.name == name), None)

    def limits_per(self, unit: str) -> tuple[Limit, ...]:
        """The limits counting `unit` (connection, message or recipient), in policy order."""
        return self._by_unit[unit]


def _build_limits(items: list[Limit]) -> tuple[Limit, ...]:
    names = [limit.name for limit in items]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"limit names must be unique; {', '.join(duplicates)} appears twice")
    return tuple(items)


LIMIT_SPEC = Struct({
    "name": Field(Str(max_len=64), doc="The limit's name, in logs and `ratelimit show`."),
    "key": Field(Str(KEYS), "client_ip",
                 doc="What is counted together: client_ip, sender or auth_user."),
    "per": Field(Str(UNITS), "message",
                 doc="What one event is: connection, message or recipient."),
    "rate": Field(Rate(), doc="How fast the bucket refills."),
    "burst": Field(Number(1, 1_000_000, integer=True), doc="Events that may come at once."),
}, build=Limit, expected="a limit with name, key, per, rate and burst")

AUTH_METHODS = {
    "spf": ("fail", "softfail", "neutral", "none", "permerror", "temperror"),
    "spf_helo": ("fail", "softfail", "neutral", "none", "permerror", "temperror"),
    "dkim": ("fail", "policy", "neutral", "none", "permerror", "temperror"),
    "dmarc": ("fail", "none", "permerror", "temperror"),
    "arc": ("fail", "none"),
}


class _AuthResult(Str):
    """A result the auth milter reports, as RFC 8601 writes it: dmarc=fail."""

    expected = "method=result, like dmarc=fail or spf=softfail"

    def parse(self, text: str) -> str:
        method, sep, result = text.strip().lower().partition("=")
        if not sep or method not in AUTH_METHODS or result not in AUTH_METHODS[method]:
            known = "; ".join(f"{m}={'|'.join(r)}" for m, r in AUTH_METHODS.items())
            raise ValueError(f"expected method=result, one of: {known}")
        return f"{method}={result}"


POINTS_SPEC = Struct({
    "half_life": Field(Duration(minimum=1), 3600.0,
                       doc="Points halve over this time, so a source is re-admitted gradually."),
    "halve_rate_every": Field(Number(0.1, 1e6), 10.0,
                              doc="Every this many points halve the IP's rates and bursts."),
    "tempfail_at": Field(Number(0.1, 1e9), 50.0,
                         doc="At this many points all new mail from the IP gets blocked_reply."),
    "rejected_recipient": Field(Number(0, 1e6), 2.0,
                                doc="Points per recipient your MTA rejected (e.g. unknown user)."),
    "too_many_recipients": Field(Struct({
        "over": Field(Number(1, 100000, integer=True), 50,
                      doc="More recipients than this adds the points, once per message."),
        "points": Field(Number(0, 1e6), 5.0, doc="Points added."),
    }, build=TooManyRecipients), factory=TooManyRecipients,
                                 doc="Points for a message with many recipients."),
    "connection_without_mail": Field(Number(0, 1e6), 1.0,
                                     doc="Points for a connection that never sent MAIL FROM."),
    "bad_networks": Field(Struct({
        "points": Field(Number(0, 1e9), 20.0, doc="Points per connection."),
        "networks": Field(ListOf(Network()), (), doc="The networks (IPs/CIDRs)."),
    }, build=lambda points, networks: BadNetworks(points, tuple(networks))),
        factory=BadNetworks, doc="Networks you distrust: points on every connection."),
    "auth_results": Field(MapOf(_AuthResult(), Number(0, 1e6),
                                "a mapping of method=result: points, like dmarc=fail: 10"),
                          factory=dict,
                          doc="Points per auth result, e.g. {dmarc=fail: 10}; needs auth before "
                              "ratelimit in the chain."),
}, build=PointsSettings)

SETTINGS_SPEC = Struct({
    "exempt_internal": Field(Bool(), True, doc="internal_networks are never slowed down."),
    "allowlist": Field(ListOf(Network()), (), doc="Clients (IPs/CIDRs) never slowed down."),
    "limits": Field(ListOf(LIMIT_SPEC, check=_build_limits), DEFAULT_LIMITS,
                    doc="Leaky buckets; mail beyond one gets reply."),
    "reply": Field(Reply("4"), DEFAULT_REPLY,
                   doc="The reply beyond a limit (4xx, so real servers retry)."),
    "blocked_reply": Field(Reply("45"), DEFAULT_BLOCKED, doc="The reply at tempfail_at points."),
    "points": Field(POINTS_SPEC, factory=PointsSettings,
                    doc="Spam points per client IP (SpamGuard)."),
    "on_store_failure": Field(Str(("tempfail", "local")), "tempfail",
                              doc="The store cannot be reached: tempfail (store_failure_reply) or"
                                  " local (count in memory until it is back)."),
    "store_failure_reply": Field(Reply("4"), DEFAULT_STORE_FAILURE,
                                 doc="The reply when the store fails and on_store_failure is "
                                     "tempfail."),
}, build=lambda allowlist, **kw: RatelimitSettings(allowlist=tuple(allowlist), **kw),
    expected="the ratelimit settings")


@dataclass(frozen=True)
class RatelimitExpectation:
    action: str | None = None
    rule: str | None = None
    reply: str | None = None  # the last message's reply starts with this ('250' = accepted)


EXPECT_SPEC = Struct({
    "action": Field(Str(ACTIONS), None, doc="The expected action: enforce or exempt."),
    "rule": Field(Str(), None, doc="The rule expected to decide; (defaults) when none does."),
    "reply": Field(Str(), None, doc="The last message's reply starts with this (250 = accepted)."),
}, build=RatelimitExpectation, expected="expectations: action, rule, reply")
