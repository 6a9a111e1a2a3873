"""The gateway config file (`--config`): where state and the queue live, what `serve`
listens on and relays to, which milters run, and which policy applies.

With no --config, the embedded defaults of DESIGN.md section 4 apply: SMTP on
127.0.0.1:2525, SQLite state in ./var/state.db, the spool in ./var/spool, Maildir delivery
to ./var/maildir, the ratelimit milter, and the policy policies/default.yaml. Relative paths
in a config file are relative to that file's directory, so a config works whatever the
current directory is; the embedded defaults are relative to the current directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .config_console import ConsoleSettings, console_spec
from .config_review import ReviewSettings, review_spec
from .dns import DnsSettings, parse_nameserver
from .eventlog import LOG_FORMATS, LOG_TARGETS, LogSettings
from .shipped import shipped_policy
from .secrets import SecretSource, mask_url, redis_url_secret
from .policy.schema import (INVALID, Address, Bool, CaFile, Duration, Either, Field, ListOf,
                            MapOf, Network, Number, Str, Struct)
from .policy.matching import AddressPattern, NetworkPattern, normalize_domain
from .policy.yamlnodes import Node, Problems, ScalarNode, compose_file

DEFAULT_POLICY = Path("policies/default.yaml")
DEFAULT_RETRY = (60.0, 300.0, 900.0, 1800.0, 3600.0)
STORE_SCHEMES = ("memory:", "sqlite:", "redis:", "rediss:")


@dataclass(frozen=True)
class QueueSettings:
    dir: Path = Path("var/spool")
    max_age: float = 5 * 86400.0  # then the message bounces
    retry: tuple[float, ...] = DEFAULT_RETRY  # waits between attempts; the last one repeats
    # The delivery process's nice value: queued mail is safe on disk and can wait a moment,
    # a client waiting for its reply (and its milters) should not. 0 = same as serve.
    delivery_nice: int = 5


# How long serve waits on a milter (Postfix's milter_connect_timeout, milter_command_timeout,
# milter_content_timeout). Connect is shorter than Postfix's 30s: the client waits on it at
# MAIL FROM, and a milter on loopback or a unix socket that does not answer in 5s is down.
MILTER_CONNECT_TIMEOUT = 5.0
MILTER_COMMAND_TIMEOUT = 30.0
MILTER_CONTENT_TIMEOUT = 300.0

# Outbound TLS per route, Postfix's smtp_tls_security_level: none (never STARTTLS), may
# (STARTTLS when offered, no certificate check, plain if it fails), encrypt (TLS required, no
# certificate check), verify (TLS required, certificate and host name checked).
TLS_LEVELS = ("none", "may", "encrypt", "verify")


@dataclass(frozen=True)
class RelayTarget:
    """Where a route's mail goes (smtp:[host]:port or maildir:DIR) and its outbound TLS."""

    target: str
    tls: str = "may"
    ca_file: Path | None = None  # verify: the CAs to trust; None = the system's

    def __str__(self) -> str:  # logs show the target, as when a route was a plain string
        return self.target


@dataclass(frozen=True)
class MilterSetting:
    """A milter in `serve`'s chain: one of ours (started by serve) or an external socket."""

    name: str
    socket: str | None = None  # None: serve starts `mailmoat milter NAME` on a unix socket
    on_failure: str = "tempfail"
    # Keep the connection for the next SMTP session (QUIT_NC). None: yes for the milters
    # serve starts (tested with them), no for external ones unless the admin says so.
    reuse_connection: bool | None = None
    # Per milter, not gateway-wide as in Postfix: our milters differ by orders of magnitude
    # (ratelimit answers in milliseconds, neutralize converts documents for seconds), and
    # one value would be too loose for the one or too tight for the other.
    connect_timeout: float = MILTER_CONNECT_TIMEOUT
    command_timeout: float = MILTER_COMMAND_TIMEOUT
    content_timeout: float = MILTER_CONTENT_TIMEOUT
    # Also run on mail the milters hand back (serve's re-injection listener): copies and
    # notices must be signed as they leave. None: the command line's default per milter
    # (yes for sign only: the others judged the original already).
    reinjection: bool | None = None

    @property
    def reuses_connection(self) -> bool:
        return self.socket is None if self.reuse_connection is None else self.reuse_connection


@dataclass(frozen=True)
class GatewayConfig:
    hostname: str = "localhost"
    store: str = "sqlite:///./var/state.db"
    store_timeout: float = 2.0
    # Where the Redis password is (store_password_env / store_password_file), never the URL.
    store_password: SecretSource = SecretSource()
    policy: Path = DEFAULT_POLICY
    source: str = "(embedded defaults)"  # the file it came from
    queue: QueueSettings = QueueSettings()
    listen: str = "127.0.0.1:2525"
    reinject_listen: str = "127.0.0.1:10026"
    metrics_listen: str = "127.0.0.1:9781"  # Prometheus text format; "" turns it off
    relay_domains: tuple[str, ...] = ()
    relay_default: RelayTarget = RelayTarget("maildir:var/maildir")  # or smtp:[host]:port
    relay_routes: dict[str, RelayTarget] = field(default_factory=dict)  # A-label domain keys
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 200
    max_connections_per_ip: int = 20
    tls_cert: Path | None = None  # with tls_key: STARTTLS is offered
    tls_key: Path | None = None
    # SMTP AUTH users (mta.smtp_in.users format); None: AUTH is not offered.
    auth_users_file: Path | None = None
    run_dir: Path = Path("var/run")
    milters: tuple[MilterSetting, ...] = (MilterSetting("ratelimit"),)
    valid_recipients: tuple[AddressPattern, ...] = ()  # empty: no recipient validation
    # Clients allowed to use XCLIENT (present another client address): none by default.
    xclient_hosts: tuple[NetworkPattern, ...] = ()
    dns: DnsSettings = DnsSettings()  # the milters' resolver (SPF, DKIM, DMARC)
    # Whom `serve` started as root becomes once its ports are bound (mta/gateway/privileges.py);
    # group: that user's primary group unless named.
    user: str | None = None
    group: str | None = None
    smtpd: "SmtpdLimits" = field(default_factory=lambda: SmtpdLimits())
    log: LogSettings = LogSettings()  # key=value or JSON lines, to stderr or syslog
    console: ConsoleSettings = ConsoleSettings()  # configured: serve starts it
    audit: "AuditSettings" = field(default_factory=lambda: AuditSettings())
    review: "ReviewSettings" = field(default_factory=lambda: ReviewSettings())


# -- the audit log (milters/core/audit) ------------------------------------------------------
AUDIT_RETENTION = 90 * 86400.0


@dataclass(frozen=True)
class AuditSettings:
    """`audit:`: whether message stories are recorded, how long they are kept, and where."""

    enabled: bool = True
    retention: float = AUDIT_RETENTION  # seconds; 0 = keep forever
    file: Path | None = None  # None: beside the store's SQLite file, or in its Redis


def _audit_spec(local: Callable[[str], Path]) -> Struct:
    return Struct({
        "enabled": Field(Bool(), True,
                         doc="Record each message's story (received, each milter's verdict and "
                             "edits, deliveries, releases) in the hash-chained audit log."),
        "retention": Field(Duration(minimum=0), AUDIT_RETENTION,
                           doc="How long audit records are kept, like 90d; 0 = forever. Older "
                               "ones are purged and the chain stays verifiable from an anchor."),
        "file": Field(Str(), None,
                      doc="The audit log's SQLite file. Not set: beside a SQLite store's file "
                          "(state.db -> state-audit.db), or in Redis with a redis:// store. A "
                          "memory:// store keeps it in memory."),
    }, build=lambda enabled, retention, file: AuditSettings(
        enabled, retention, local(file) if file else None),
        expected="audit settings: enabled, retention, file")
# -- end of the audit log --------------------------------------------------------------------




@dataclass(frozen=True)
class SmtpdLimits:
    """How long an SMTP client may take, with Postfix's defaults: smtpd_timeout 300s
    (idle limit and deadline per command line), 10s under stress (${stress?{10}:{300}}s),
    DATA's deadline growing by a second per smtpd_min_data_rate bytes (500)."""

    timeout: float = 300.0
    stress_timeout: float = 10.0
    min_data_rate: int = 500
    stress_share: float = 0.8  # stress once open connections reach this share of the limit


def default_policy_path() -> Path:
    """policies/default.yaml in the current directory, else the one shipped with mailmoat."""
    return DEFAULT_POLICY if DEFAULT_POLICY.exists() else shipped_policy()


def _relay_target(text: str) -> str:
    if not (text.startswith("maildir:") or text.startswith("smtp:")):
        raise ValueError("a relay target is smtp:[host]:port or maildir:DIRECTORY")
    return text


def _store_password(store: str, env: str, file: str,
                    local: Callable[[str], Path]) -> SecretSource:
    if env and file:
        raise ValueError("set store_password_env or store_password_file, not both")
    if (env or file) and not store.startswith(("redis:", "rediss:")):
        raise ValueError("store_password_env and store_password_file are for a redis:// "
                         "store only (this store has no password)")
    return SecretSource(env, str(local(file)) if file else "")


class _Nameserver(Str):
    expected = "an IP address with an optional port, like 127.0.0.1:5353"

    def parse(self, text: str) -> tuple[str, int]:
        return parse_nameserver(text)


class _Target(Str):
    expected = "smtp:[host]:port or maildir:DIRECTORY"

    def parse(self, text: str) -> str:
        return _relay_target(text)


class _RouteDomain(Str):
    """A route's domain, kept as its A-label form: routing compares canonical names only."""

    expected = "a domain name"

    def parse(self, text: str) -> str:
        domain = normalize_domain(text)
        if not domain or not domain.isascii():
            raise ValueError("not a valid domain name (IDNA 2008)")
        return domain


def _route(target: str, tls: str | None, ca_file: Path | None) -> RelayTarget:
    if target.startswith("maildir:") and (tls is not None or ca_file is not None):
        raise ValueError("tls and ca_file apply to smtp: targets only")
    if ca_file is not None and tls != "verify":
        raise ValueError("ca_file is used only with tls: verify")
    return RelayTarget(target, tls or "may", ca_file)


class _StoreUrl(Str):
    """The store URL; a Redis password in it is refused, and never echoed."""

    def read(self, node: Node, path: str, problems: Problems) -> Any:
        text = node.value if isinstance(node, ScalarNode) else ""
        problem = redis_url_secret(text)
        if problem:
            problems.add(node, path, f"{problem}; never write a secret into the config: "
                         "name where it is with store_password_env: VARIABLE (an environment "
                         "variable) or store_password_file: /etc/mailmoat/redis.pass (mode "
                         "0600 or 0640)", mask_url(text))
            return INVALID
        return super().read(node, path, problems)


def _spec(base: Path, source: str) -> Struct:
    def local(path: str) -> Path:
        return base / path

    def relay_path(route: str | RelayTarget) -> RelayTarget:
        route = RelayTarget(route) if isinstance(route, str) else route  # the string form
        if not route.target.startswith("maildir:"):
            return route
        return replace(route, target=f"maildir:{local(route.target[8:])}")

    def build(gateway: dict, store: str, store_timeout: float, policy: str | None,
              milters: list[MilterSetting], dns: DnsSettings, store_password_env: str,
              store_password_file: str, console: ConsoleSettings,
              audit: AuditSettings, review: ReviewSettings) -> GatewayConfig:
        if not store.startswith(STORE_SCHEMES):
            raise ValueError("store must be memory://, sqlite:///PATH or redis://HOST:PORT/DB")
        store_password = _store_password(store, store_password_env, store_password_file,
                                         local)
        if store.startswith("sqlite:///") and not store.startswith("sqlite:////"):
            store = "sqlite:///" + str(local(store[len("sqlite:///"):]))
        queue, relay = gateway["queue"], gateway["relay"]
        return GatewayConfig(
            hostname=gateway["hostname"], store=store, store_timeout=store_timeout,
            store_password=store_password,
            policy=local(policy) if policy else default_policy_path(), source=source,
            queue=QueueSettings(local(queue["dir"]), queue["max_age"], tuple(queue["retry"]),
                                queue["delivery_nice"]),
            listen=gateway["listen"], reinject_listen=gateway["reinject_listen"],
            metrics_listen=gateway["metrics_listen"],
            relay_domains=tuple(d.lower() for d in gateway["relay_domains"]),
            relay_default=relay_path(relay["default"]),
            relay_routes={d: relay_path(t) for d, t in relay["routes"].items()},
            max_message_size=gateway["max_message_size"],
            max_recipients=gateway["max_recipients"],
            max_connections=gateway["max_connections"],
            max_connections_per_ip=gateway["max_connections_per_ip"],
            tls_cert=local(gateway["tls"]["cert"]) if gateway["tls"] else None,
            tls_key=local(gateway["tls"]["key"]) if gateway["tls"] else None,
            auth_users_file=local(gateway["auth"]["users_file"]) if gateway["auth"] else None,
            run_dir=local(gateway["run_dir"]),
            milters=tuple(milters), xclient_hosts=tuple(gateway["xclient_hosts"]),
            valid_recipients=tuple(gateway["valid_recipients"]), dns=dns,
            smtpd=SmtpdLimits(gateway["smtpd_timeout"], gateway["smtpd_stress_timeout"],
                              gateway["smtpd_min_data_rate"], gateway["smtpd_stress_share"]),
            user=gateway["user"], group=gateway["group"], log=gateway["log"],
            console=console, audit=audit, review=review)

    defaults = GatewayConfig()
    queue = Struct({
        "dir": Field(Str(), "var/spool",
                     doc="The spool directory: each accepted message is written and fsynced here "
                         "before the 250 reply."),
        "max_age": Field(Duration(minimum=60), defaults.queue.max_age,
                         doc="How long a message may wait for delivery; after that it bounces to "
                             "its sender."),
        "retry": Field(ListOf(Duration(minimum=1), min_items=1), DEFAULT_RETRY,
                       doc="Waits between delivery attempts; the last one repeats until max_age."),
        "delivery_nice": Field(Number(0, 19, integer=True), defaults.queue.delivery_nice,
                               doc="The delivery process's nice value (0-19): queued mail can "
                                   "wait, a client waiting for its reply should not. 0 = same as "
                                   "serve."),
    })
    # A route is a target string, or a mapping that adds its outbound TLS:
    # {target: "smtp:[mx.example]:25", tls: verify, ca_file: ca.pem}
    route = Either(_Target(), Struct({
        "target": Field(_Target(), doc="Where mail goes: smtp:[host]:port or maildir:DIRECTORY."),
        "tls": Field(Str(TLS_LEVELS), None,
                     doc="Outbound TLS as Postfix's smtp_tls_security_level: none, may (STARTTLS "
                         "when offered, unchecked), encrypt (TLS required, unchecked), verify "
                         "(certificate and host name checked). Not set: may."),
        "ca_file": Field(CaFile(base), None,
                         doc="For tls: verify, the CA certificates to trust; not set = the "
                             "system's."),
    }, build=_route, expected="a route mapping: target, tls, ca_file"))
    relay = Struct({
        "default": Field(route, defaults.relay_default,
                         doc="Where mail goes when no route matches its recipient domain."),
        "routes": Field(MapOf(_RouteDomain(), route, "a mapping of domain: smtp:[host]:port, "
                                                     "maildir:DIRECTORY or a route mapping"),
                        factory=dict,
                        doc="Per recipient domain (and its subdomains): where its mail goes, as a"
                            " target or a route mapping."),
    })
    log = Struct({
        "format": Field(Str(LOG_FORMATS), defaults.log.format,
                        doc="keyvalue: one key=value line per event, like Postfix's; json: one "
                            "JSON object per line with the same keys plus time, program and "
                            "level."),
        "to": Field(Str(LOG_TARGETS), defaults.log.to,
                    doc="stderr (journald or the caller keeps it) or syslog: the local socket "
                        "/dev/log ($MAILMOAT_SYSLOG_SOCKET), facility mail; start fails when "
                        "no syslog daemon listens."),
    }, build=LogSettings, expected="log settings: format, to")
    gateway = Struct({
        "hostname": Field(Str(max_len=253), defaults.hostname,
                          doc="The gateway's name: HELO/EHLO, Received headers, bounces and the "
                              "authserv-id of Authentication-Results."),
        "listen": Field(Str(), defaults.listen,
                        doc="SMTP listener as HOST:PORT (port 25 for an MX)."),
        "reinject_listen": Field(Str(), defaults.reinject_listen,
                                 doc="Loopback SMTP listener where milters hand back split copies"
                                     " and password notices; mail on it skips the milter chain."),
        "metrics_listen": Field(Str(), defaults.metrics_listen,
                                doc="HOST:PORT of the Prometheus metrics listener; \"\" turns it "
                                    "off."),
        "relay_domains": Field(ListOf(Str()), (),
                               doc="Recipient domains outside clients may send to; mail to others"
                                   " needs an internal network or SMTP AUTH (no open relay)."),
        "relay": Field(relay, factory=lambda: relay.read(None, "", Problems(source)),
                       doc="Where accepted mail is delivered: a default target and per-domain "
                           "routes."),
        "queue": Field(queue, factory=lambda: queue.read(None, "", Problems(source)),
                       doc="The spool and its retry schedule."),
        "max_message_size": Field(Number(1024, 2**31, integer=True), defaults.max_message_size,
                                  doc="Largest message accepted, in bytes (announced as SIZE; "
                                      "larger gets 552)."),
        "max_recipients": Field(Number(1, 100000, integer=True), defaults.max_recipients,
                                doc="Recipients per message; more get 452 and the client sends "
                                    "them again later."),
        "max_connections": Field(Number(1, 100000, integer=True), defaults.max_connections,
                                 doc="Open SMTP connections at once; beyond it new clients get "
                                     "421."),
        "max_connections_per_ip": Field(Number(1, 100000, integer=True),
                                        defaults.max_connections_per_ip,
                                        doc="Open SMTP connections from one client address."),
        "tls": Field(Struct({
            "cert": Field(Str(), doc="Certificate chain file (PEM)."),
            "key": Field(Str(), doc="Private key file (PEM); must not be readable by group or "
                                    "others."),
        }), None,
                     doc="Inbound STARTTLS: the certificate and key files. Not set: STARTTLS is "
                         "not offered."),
        "auth": Field(Struct({
            "users_file": Field(Str(), doc="The users file (`mailmoat user add`) that AUTH "
                                           "PLAIN/LOGIN checks."),
        }), None,
                      doc="SMTP AUTH for submitting users. Not set: AUTH is not offered."),
        "run_dir": Field(Str(), "var/run",
                         doc="Where serve puts the unix sockets of the milters it starts."),
        "xclient_hosts": Field(ListOf(Network()), (),
                               doc="Clients allowed to use XCLIENT (present another client "
                                   "address); none by default."),
        "valid_recipients": Field(ListOf(Address()), (),
                                  doc="Who exists in relay_domains, as address patterns; others "
                                      "get 550 at RCPT. [] = everyone."),
        # SMTP client deadlines (SmtpdLimits, Postfix's smtpd_timeout and friends)
        "smtpd_timeout": Field(Duration(minimum=1), defaults.smtpd.timeout,
                               doc="How long a client may be silent (Postfix's smtpd_timeout)."),
        "smtpd_stress_timeout": Field(Duration(minimum=1), defaults.smtpd.stress_timeout,
                                      doc="The same, once the server is under stress (see "
                                          "smtpd_stress_share)."),
        "smtpd_min_data_rate": Field(Number(1, 2**31, integer=True),
                                     defaults.smtpd.min_data_rate,
                                     doc="DATA's deadline grows by one second per this many bytes"
                                         " received."),
        "smtpd_stress_share": Field(Number(0.05, 1.0), defaults.smtpd.stress_share,
                                    doc="Stress begins when open connections reach this share of "
                                        "max_connections."),
        "user": Field(Str(max_len=32), None,
                      doc="Whom serve, started as root, becomes once its ports are bound."),
        "group": Field(Str(max_len=32), None,
                       doc="The group for user; not set = that user's primary group."),
        # Every process serve starts logs the same way (they read the same config).
        "log": Field(log, factory=lambda: log.read(None, "", Problems(source)),
                     doc="How each process logs: the form of a line and where it goes."),
    })
    milter = Struct({
        "name": Field(Str(max_len=64),
                      doc="The milter: ratelimit, auth, neutralize, attachments or sign (started "
                          "by serve), or any name with socket: for an external milter."),
        "socket": Field(Str(), None,
                        doc="An external milter's socket, as Postfix writes it "
                            "(inet:127.0.0.1:8891, unix:/path). Not set: serve starts `mailmoat "
                            "milter NAME` itself."),
        "on_failure": Field(Str(("tempfail", "reject", "accept")), "tempfail",
                            doc="The reply for the rest of the session when the milter dies, "
                                "times out or answers garbage: tempfail (451), reject (550) or "
                                "accept (go on without it)."),
        "reuse_connection": Field(Bool(), None,
                                  doc="Keep the milter connection for the next SMTP session. Not "
                                      "set: yes for milters serve starts, no for external ones."),
        "connect_timeout": Field(Duration(minimum=0.1), MILTER_CONNECT_TIMEOUT,
                                 doc="Time to connect to the milter."),
        "command_timeout": Field(Duration(minimum=0.1), MILTER_COMMAND_TIMEOUT,
                                 doc="Time for the milter to answer one command."),
        "content_timeout": Field(Duration(minimum=0.1), MILTER_CONTENT_TIMEOUT,
                                 doc="Time for the milter to answer at end of message (where "
                                     "conversions happen)."),
        "reinjection": Field(Bool(), None,
                             doc="Also run this milter on re-injected mail (copies, notices). Not"
                                 " set: yes for sign only."),
    }, build=MilterSetting)
    console = console_spec(base)
    audit = _audit_spec(local)
    review = review_spec(local)
    return Struct({
        "audit": Field(audit, factory=lambda: audit.read(None, "", Problems(source)),
                       doc="The audit log of message stories (docs/audit.md)."),
        "gateway": Field(gateway, factory=lambda: gateway.read(None, "", Problems(source)),
                         doc="The SMTP front end, the queue and delivery."),
        "store": Field(_StoreUrl(), defaults.store,
                       doc="Shared state (rate-limit buckets, points, notice log): memory://, "
                           "sqlite:///PATH or redis://HOST:PORT/DB."),
        "store_timeout": Field(Duration(minimum=0.05), defaults.store_timeout,
                               doc="How long one Store operation may take before it counts as a "
                                   "store failure."),
        "store_password_env": Field(Str(max_len=200), "",
                                    doc="Environment variable holding the Redis password (never "
                                        "in the URL or the file)."),
        "store_password_file": Field(Str(max_len=1000), "",
                                     doc="File holding the Redis password; must not be readable "
                                         "by others."),
        "policy": Field(Str(), None,
                        doc="The policy file. Not set: the default policy shipped with mailmoat."),
        "milters": Field(ListOf(milter), factory=lambda: list(defaults.milters),
                         doc="The milter chain, in order; the first reject, tempfail or discard "
                             "ends it."),
        "dns": Field(Struct({
            "nameservers": Field(ListOf(_Nameserver()), (),
                                 doc="Nameservers as HOST or HOST:PORT; [] = the system "
                                     "resolver."),
            "timeout": Field(Duration(minimum=0.1), defaults.dns.timeout,
                             doc="Time for one DNS query."),
        }, build=lambda nameservers, timeout: DnsSettings(tuple(nameservers), timeout),
            expected="dns settings: nameservers, timeout"), DnsSettings(),
                     doc="The resolver the milters use (SPF, DKIM, DMARC)."),
        "review": Field(review, factory=lambda: review.read(None, "", Problems(source)),
                        doc="Outbound review's links, notices and records (the policy action "
                            "review:)."),
        "console": Field(console, factory=lambda: replace(
            console.read(None, "", Problems(source)), configured=False),
                         doc="The web console (`mailmoat console`): who may log in, where it "
                             "listens, its sessions. Written (even empty): serve starts it."),
    }, build=build, expected="a mailmoat config mapping")


def load_config(path: str | Path | None) -> GatewayConfig:
    """Load --config FILE, or return the embedded defaults when path is None."""
    if path is None:
        problems = Problems("(embedded defaults)")
        config = _spec(Path("."), "(embedded defaults)").read(None, "", problems)
    else:
        path = Path(path)
        problems = Problems(str(path))
        config = _spec(path.parent, str(path)).read(compose_file(path), "", problems)
    problems.raise_if_any()
    return config
