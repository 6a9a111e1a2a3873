"""The `auth:` section of a policy, its rule action and its test expectations."""
from __future__ import annotations

from dataclasses import dataclass, field

from milters.core.policy.schema import (Bool, Duration, Field, ListOf, MapOf, Number, Reply, Str,
                                        Struct)
from milters.core.verdict import SmtpReply


@dataclass(frozen=True)
class DkimSettings:
    min_rsa_bits: int = 1024
    allow_expired: bool = False
    # A signature whose l= leaves part of the body unsigned lets anyone append text (or a
    # whole new MIME part) below a valid signature: not a pass unless the policy says so.
    allow_partial_body: bool = False
    # RFC 8301 3.1: verifiers must not consider rsa-sha1 signatures valid.
    allow_sha1: bool = False


@dataclass(frozen=True)
class SpfLimits:
    """RFC 7208 4.6.4: at most 10 lookups causing terms, 2 void lookups."""

    lookups: int = 10
    void_lookups: int = 2
    timeout: float = 20.0  # all lookups of one check together (RFC 7208 4.6.4: >= 20 s)


MILTER = "auth"
# enforce: check, write the header, act on the result; tag: check and write the header
# only; skip: no checks, no header (forged headers are still removed).
ACTIONS = ("enforce", "tag", "skip")
# What to do with a message whose DMARC check failed, per the disposition its domain asks.
OUTCOMES = ("reject", "quarantine", "tag")
DISPOSITIONS = ("reject", "quarantine", "none")

DEFAULT_REJECT = SmtpReply(550, "5.7.1", "Email rejected per DMARC policy of the From domain")
DEFAULT_TEMPFAIL = SmtpReply(451, "4.4.3", "Temporary DNS failure checking the sender; "
                                           "try again later")


@dataclass(frozen=True)
class DmarcActions:
    """Our action for a failing message, by the disposition its domain publishes (after
    pct=). Per-domain entries override single dispositions."""

    reject: str = "reject"
    quarantine: str = "quarantine"
    none: str = "tag"

    def for_disposition(self, disposition: str) -> str:
        return str(getattr(self, disposition))


@dataclass(frozen=True)
class AuthSettings:
    internal: str = "skip"  # what internal networks get: enforce | tag | skip
    authenticated: str = "skip"  # what SMTP-authenticated clients get
    spf: SpfLimits = field(default_factory=SpfLimits)
    check_helo: bool = True  # also report smtp.helo (RFC 7208 2.3)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    max_signatures: int = 10
    trusted_arc_sealers: tuple[str, ...] = ()
    dmarc_actions: DmarcActions = field(default_factory=DmarcActions)
    dmarc_domains: dict[str, DmarcActions] = field(default_factory=dict)
    honour_pct: bool = True
    reject_reply: SmtpReply = DEFAULT_REJECT
    on_temperror: str = "tempfail"  # tempfail | tag
    temperror_reply: SmtpReply = DEFAULT_TEMPFAIL
    # A From header missing, or an author address without a domain (DMARC permerror): tag
    # or reject. Several From authors are each judged by DMARC (checker.act).
    on_bad_from: str = "tag"
    bad_from_reply: SmtpReply = SmtpReply(550, "5.7.1", "Message has no single valid From "
                                                        "address (RFC 5322 3.6.2)")
    # Tally each DMARC evaluation in the Store for `mailmoat dmarc report` (RFC 7489 7.2).
    record_results: bool = False
    keep_results: float = 31 * 86400.0

    def actions_for(self, domain: str) -> DmarcActions:
        """The From domain's own entry, else its nearest parent's, else the defaults."""
        labels = domain.lower().split(".")
        for start in range(len(labels)):
            entry = self.dmarc_domains.get(".".join(labels[start:]))
            if entry is not None:
                return entry
        return self.dmarc_actions


def _outcomes(defaults: DmarcActions) -> Struct:
    return Struct({name: Field(Str(OUTCOMES), getattr(defaults, name),
                               doc=f"The action for a failure under p={name}.")
                   for name in DISPOSITIONS},
                  build=DmarcActions,
                  expected="what to do per disposition: reject, quarantine and none, each "
                           "one of reject, quarantine, tag")


class _Domain(Str):
    expected = "a domain like example.com"

    def parse(self, text: str) -> str:
        domain = text.strip().lower().lstrip("@").rstrip(".")
        if not domain or " " in domain or "@" in domain or "." not in domain:
            raise ValueError("expected a domain like example.com")
        return domain


SPF_SPEC = Struct({
    "lookup_limit": Field(Number(1, 100, integer=True), 10,
                          doc="DNS lookups per SPF check (RFC 7208 4.6.4); more is permerror."),
    "void_lookup_limit": Field(Number(0, 100, integer=True), 2,
                               doc="SPF lookups that find nothing; more is permerror."),
    "timeout": Field(Number(1, 120), 20.0, doc="Seconds for all lookups of one SPF check."),
    "check_helo": Field(Bool(), True, doc="Also check the HELO name (spf_helo in rules)."),
}, build=lambda lookup_limit, void_lookup_limit, timeout, check_helo: (
    SpfLimits(lookup_limit, void_lookup_limit, timeout), check_helo),
    expected="SPF settings: lookup_limit, void_lookup_limit, timeout, check_helo")

DKIM_SPEC = Struct({
    "min_rsa_bits": Field(Number(512, 8192, integer=True), 1024,
                          doc="Smaller RSA keys give dkim=policy, not pass."),
    "allow_expired": Field(Bool(), False, doc="Accept a signature past its x= time."),
    "allow_partial_body": Field(Bool(), False,
                                doc="Accept l= signatures that leave part of the body unsigned."),
    "allow_sha1": Field(Bool(), False,
                        doc="Accept rsa-sha1 signatures (RFC 8301 says no: dkim=policy)."),
    "max_signatures": Field(Number(1, 50, integer=True), 10,
                            doc="DKIM signatures checked per message."),
}, build=lambda max_signatures, **kw: (DkimSettings(**kw), max_signatures),
    expected="DKIM settings: min_rsa_bits, allow_expired, allow_partial_body, allow_sha1, "
             "max_signatures")

DMARC_SPEC = Struct({
    "actions": Field(_outcomes(DmarcActions()), factory=DmarcActions,
                     doc="What a DMARC failure leads to, per the From domain's published policy "
                         "(after pct=)."),
    "domains": Field(MapOf(_Domain(), _outcomes(DmarcActions()),
                           "a mapping of domain: {reject: ..., quarantine: ..., none: ...}"),
                     factory=dict,
                     doc="Per-domain exceptions to actions, e.g. {bank.example: {none: "
                         "quarantine}}."),
    "honour_pct": Field(Bool(), True,
                        doc="Apply the domain's pct= (a sampled failure gets the next weaker "
                            "policy)."),
    "reject_reply": Field(Reply("5"), DEFAULT_REJECT, doc="The reply when DMARC leads to reject."),
}, build=lambda **kw: kw, expected="DMARC settings: actions, domains, honour_pct, reject_reply")


def _build(internal: str, authenticated: str, spf: tuple | None,
           dkim: tuple | None, arc_trusted_sealers: list[str], dmarc: dict | None,
           on_temperror: str, temperror_reply: SmtpReply, on_bad_from: str,
           bad_from_reply: SmtpReply, reports: dict | None) -> AuthSettings:
    limits, check_helo = spf if spf else (SpfLimits(), True)
    dkim_settings, max_signatures = dkim if dkim else (DkimSettings(), 10)
    dmarc = dmarc or {}
    return AuthSettings(
        internal=internal, authenticated=authenticated, spf=limits,
        check_helo=check_helo, dkim=dkim_settings, max_signatures=max_signatures,
        trusted_arc_sealers=tuple(s.lower().rstrip(".") for s in arc_trusted_sealers),
        dmarc_actions=dmarc.get("actions", DmarcActions()),
        dmarc_domains=dmarc.get("domains", {}), honour_pct=dmarc.get("honour_pct", True),
        reject_reply=dmarc.get("reject_reply", DEFAULT_REJECT), on_temperror=on_temperror,
        temperror_reply=temperror_reply, on_bad_from=on_bad_from, bad_from_reply=bad_from_reply,
        record_results=(reports or {}).get("record", False),
        keep_results=(reports or {}).get("keep", 31 * 86400.0))


SETTINGS_SPEC = Struct({
    "internal": Field(Str(ACTIONS), "skip",
                      doc="Mail from internal_networks: skip (no checks), tag (header only) or "
                          "enforce."),
    "authenticated": Field(Str(ACTIONS), "skip",
                           doc="Mail from SMTP-authenticated users: skip, tag or enforce."),
    "spf": Field(SPF_SPEC, None, doc="SPF limits."),
    "dkim": Field(DKIM_SPEC, None, doc="DKIM verification."),
    "arc_trusted_sealers": Field(ListOf(Str(max_len=253)), (),
                                 doc="Forwarders whose ARC seal we trust: a DMARC failure they "
                                     "sealed with arc=pass is only tagged."),
    "dmarc": Field(DMARC_SPEC, None, doc="DMARC (RFC 7489) actions."),
    "on_temperror": Field(Str(("tempfail", "tag")), "tempfail",
                          doc="DNS timeout or server failure while checking: tempfail (sender "
                              "retries) or tag."),
    "temperror_reply": Field(Reply("4"), DEFAULT_TEMPFAIL, doc="The reply on a DNS temperror."),
    "on_bad_from": Field(Str(("tag", "reject")), "tag",
                         doc="No From, or no usable author domain: tag or reject."),
    "bad_from_reply": Field(Reply("5"), AuthSettings().bad_from_reply,
                            doc="The reply when on_bad_from is reject."),
    "reports": Field(Struct({
        "record": Field(Bool(), False, doc="Tally each DMARC evaluation in the store."),
        "keep": Field(Duration(minimum=86400), 31 * 86400.0, doc="How long tallies are kept."),
    }, expected="reports settings: record, keep"), None,
                     doc="Recording DMARC results for aggregate reports."),
}, build=_build, expected="the auth settings")


@dataclass(frozen=True)
class AuthExpectation:
    action: str | None = None
    rule: str | None = None


EXPECT_SPEC = Struct({
    "action": Field(Str(ACTIONS), None, doc="The expected action: enforce, tag or skip."),
    "rule": Field(Str(), None,
                  doc="The rule expected to decide; (defaults) or (internal) when none does."),
}, build=AuthExpectation, expected="expectations: action, rule")
