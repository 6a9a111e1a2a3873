"""The `sign:` section of a policy (DKIM signing), its rule action and test expectations.

    sign:
      keys:                      # the KeyTable: one key per signing domain and algorithm
        - {domain: example.com, selector: s2026r, file: /etc/mailmoat/dkim/example.com.s2026r.key}
        - {domain: example.com, selector: s2026e, file: /etc/mailmoat/dkim/example.com.s2026e.key}
      domains:                   # the SigningTable: From domain (and its subdomains) -> d=
        example.org: example.com
      subdomains: true           # a From subdomain with no entry signs with its parent's keys
      expire: 0                  # x= this many seconds after t= (0: no x=)
      arc:                       # ARC sealing of inbound mail (arc_seal.py)
        seal: changed            # changed (default) | all | none
        key: s2026r._domainkey.example.com   # an RSA key of keys, by its DNS name

Keys are read when the policy loads: a key file readable by others than its owner, or not a
key, is a policy error at its line. Which mail is signed is the rules' `sign: sign | none`
(default sign), asked only for outbound mail (internal networks, SMTP AUTH).
"""
from __future__ import annotations

from dataclasses import dataclass

from milters.core.dkim_keys import check_domain, check_selector, load_private_key
from milters.core.policy.schema import Bool, Duration, Field, ListOf, MapOf, Str, Struct

from .dkim_sign import SigningKey

MILTER = "sign"
ACTIONS = ("sign", "none")
SEALS = ("changed", "all", "none")  # which inbound mail gets an ARC set
CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")
# RFC 6376 5.4.1's list of fields a signature should cover (those present are signed).
DEFAULT_HEADERS = ("from", "reply-to", "subject", "date", "to", "cc", "resent-date",
                   "resent-from", "resent-to", "resent-cc", "in-reply-to", "references",
                   "list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post",
                   "list-owner", "list-archive", "message-id", "mime-version", "content-type",
                   "content-transfer-encoding", "content-id", "content-description")
# Signed once more than present, so a second one added on the way breaks the signature
# (RFC 6376 8.15): what a reader trusts to know who wrote what.
DEFAULT_OVERSIGN = ("from", "subject", "date", "to", "cc", "reply-to", "message-id",
                    "mime-version", "content-type", "content-transfer-encoding")


@dataclass(frozen=True)
class ArcSettings:
    seal: str = "none"  # changed | all | none; without an `arc:` section nothing is sealed
    key: SigningKey | None = None


@dataclass(frozen=True)
class SignSettings:
    keys: tuple[SigningKey, ...] = ()
    domains: dict[str, str] | None = None  # From domain -> signing domain (SigningTable)
    subdomains: bool = True
    headers: tuple[str, ...] = DEFAULT_HEADERS
    oversign: tuple[str, ...] = DEFAULT_OVERSIGN
    canonicalization: str = "relaxed/relaxed"
    expire: float = 0.0  # seconds from t= to x=; 0 = no x=
    arc: ArcSettings = ArcSettings()

    @property
    def table(self) -> dict[str, str]:
        return self.domains or {}

    @property
    def key_domains(self) -> set[str]:
        return {key.domain for key in self.keys}


def _key(domain: str, selector: str, file: str) -> SigningKey:
    algorithm, private = load_private_key(file)  # KeyFileError is a ValueError: at its line
    return SigningKey(domain, selector, algorithm, private)


def _one_per_algorithm(keys: list[SigningKey]) -> tuple[SigningKey, ...]:
    seen: dict[tuple[str, str], str] = {}
    for key in keys:
        other = seen.setdefault((key.domain, key.algorithm), key.selector)
        if other != key.selector:
            raise ValueError(f"{key.domain} has two {key.algorithm} keys ({other}, "
                             f"{key.selector}); keep the one to sign with (publish the new "
                             "selector first, then switch the file and selector here)")
    return tuple(keys)


def _names(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.strip().lower() for name in names))


class _Domain(Str):
    expected = "a domain like example.com"

    def parse(self, text: str) -> str:
        return check_domain(text)


class _Selector(Str):
    expected = "a DKIM selector"

    def parse(self, text: str) -> str:
        return check_selector(text)


class _HeaderName(Str):
    expected = "a header field name"

    def parse(self, text: str) -> str:
        if not text or any(c <= " " or c == ":" or c > "~" for c in text):
            raise ValueError(f"not a header field name (got {text!r})")
        return text.lower()


def _arc(keys: tuple[SigningKey, ...], arc: dict[str, str] | None) -> ArcSettings:
    if arc is None:
        return ArcSettings()
    if arc["seal"] == "none":
        return ArcSettings("none")
    name = arc["key"].strip().lower().rstrip(".")
    if not name:
        raise ValueError(f"arc.key is required to seal ({arc['seal']}): the DNS name of an "
                         "RSA key of keys, e.g. s2026r._domainkey.example.com")
    found = [k for k in keys if f"{k.selector}._domainkey.{k.domain}" == name]
    if not found:
        known = ", ".join(f"{k.selector}._domainkey.{k.domain}" for k in keys) or "none"
        raise ValueError(f"arc.key {name} is not a key of keys (keys: {known})")
    if found[0].algorithm != "rsa-sha256":
        raise ValueError(f"arc.key {name} is {found[0].algorithm}: ARC verifiers know "
                         "rsa-sha256 only; name an RSA key")
    return ArcSettings(arc["seal"], found[0])


def _build(keys: tuple[SigningKey, ...], domains: dict[str, str], headers: tuple[str, ...],
           oversign: tuple[str, ...], arc: dict[str, str] | None,
           **kw: object) -> SignSettings:
    if "from" not in headers:
        raise ValueError("headers must include from: RFC 6376 5.4 requires it signed")
    missing = [name for name in oversign if name not in headers]
    if missing:
        raise ValueError(f"oversign names fields not in headers: {', '.join(missing)}")
    have = {key.domain for key in keys}
    unknown = sorted({d for d in domains.values() if d not in have})
    if unknown:
        raise ValueError(f"domains maps to {', '.join(unknown)}, which has no key in keys")
    return SignSettings(keys=keys, domains=domains, headers=headers, oversign=oversign,
                        arc=_arc(keys, arc), **kw)  # type: ignore[arg-type]


SETTINGS_SPEC = Struct({
    "keys": Field(ListOf(Struct({
        "domain": Field(_Domain(), doc="The signing domain (d=)."),
        "selector": Field(_Selector(), doc="The selector (s=)."),
        "file": Field(Str(max_len=1000), doc="The private key file; must be 0600 or 0400."),
    }, build=_key, expected="a key: domain, selector, file"), check=_one_per_algorithm), (),
                  doc="The KeyTable: at most one RSA and one ed25519 key per domain (`mailmoat "
                      "dkim keygen`)."),
    "domains": Field(MapOf(_Domain(), _Domain(), "a mapping of From domain: signing domain"),
                     factory=dict,
                     doc="The SigningTable: From domain (and subdomains) to signing domain. {} = "
                         "each key signs its own domain."),
    "subdomains": Field(Bool(), True,
                        doc="A From subdomain with no entry signs with its parent's keys."),
    "headers": Field(ListOf(_HeaderName(), min_items=1, check=_names), DEFAULT_HEADERS,
                     doc="Header fields signed when present; must include from."),
    "oversign": Field(ListOf(_HeaderName(), check=_names), DEFAULT_OVERSIGN,
                      doc="Fields signed once more than present, so one added on the way breaks "
                          "the signature."),
    "canonicalization": Field(Str(CANONICALIZATIONS), "relaxed/relaxed",
                              doc="DKIM c= header/body canonicalization."),
    "expire": Field(Duration(), 0.0, doc="x= this long after t=; 0 = no x=."),
    "arc": Field(Struct({
        "seal": Field(Str(SEALS), "changed",
                      doc="Which inbound mail gets an ARC set: changed (a milter edited it), all "
                          "or none."),
        "key": Field(Str(max_len=320), "",
                     doc="The RSA key of keys to seal with, by its DNS name "
                         "(s2026r._domainkey.example.jp)."),
    }, expected="ARC settings: seal, key"), None,
                 doc="ARC sealing of inbound mail. Not set: nothing is sealed."),
}, build=_build, expected="the sign settings")


@dataclass(frozen=True)
class SignExpectation:
    action: str | None = None
    rule: str | None = None
    domain: str | None = None  # the d= the message would be signed with ("" = unsigned)


EXPECT_SPEC = Struct({
    "action": Field(Str(ACTIONS), None, doc="The expected action: sign or none."),
    "rule": Field(Str(), None, doc="The rule expected to decide; (defaults) when none does."),
    "domain": Field(Str(max_len=253), None,
                    doc="The d= the message would be signed with (\"\" = unsigned)."),
}, build=SignExpectation, expected="expectations: action, rule, domain")
