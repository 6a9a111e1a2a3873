"""DMARC (RFC 7489): the policy record, identifier alignment and the resulting disposition.

Section numbers in comments are RFC 7489's. The organisational domain comes from the
public suffix list in the `publicsuffixlist` package (released with every list update).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Callable, Iterable

import idna
from publicsuffixlist import PublicSuffixList

from milters.core.dns import DnsTempError

from .dkim_check import DkimResult, TxtLookup
from .spf import SpfResult

POLICIES = ("none", "quarantine", "reject")
_psl = PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """3.2: the public suffix plus one label (the domain itself when it is a suffix)."""
    domain = domain.lower().rstrip(".")
    return _psl.privatesuffix(domain) or domain


def aligned(a: str, b: str, strict: bool) -> bool:
    """3.1: strict needs the same domain, relaxed the same organisational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if strict else organizational_domain(a) == organizational_domain(b)


def to_ascii(domain: str) -> str:
    """An IDN From domain in its A-label form, which DNS holds (ValueError if impossible)."""
    domain = domain.strip().rstrip(".")
    if domain.isascii():
        return domain.lower()
    try:  # IDNA2008 with the UTS #46 mapping, as registries and browsers use (not IDNA2003)
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(f"domain {domain} cannot be written in ASCII ({exc})") from None


@dataclass(frozen=True)
class DmarcRecord:
    policy: str  # p=
    subdomain_policy: str | None = None  # sp=
    strict_dkim: bool = False  # adkim=s
    strict_spf: bool = False  # aspf=s
    percent: int = 100  # pct=
    rua: tuple[str, ...] = ()
    text: str = ""


class RecordError(ValueError):
    """A DMARC record that cannot be used (11.2: permerror)."""


def parse_record(text: str) -> DmarcRecord:
    """6.3 and 6.6.3: v=DMARC1 first; an unusable p= is p=none when a rua= is given."""
    tags: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";")]
    for index, part in enumerate(parts):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep:
            raise RecordError(f"'{part}' is not a tag=value pair")
        if index == 0 and (name != "v" or value != "DMARC1"):
            raise RecordError("the record must start with v=DMARC1")
        tags.setdefault(name, value)
    rua = tuple(u.strip() for u in tags.get("rua", "").split(",") if u.strip().startswith(
        "mailto:"))
    policy = tags.get("p", "").lower()
    subdomain = tags.get("sp", "").lower() or None
    if policy not in POLICIES or (subdomain is not None and subdomain not in POLICIES):
        if not rua:
            raise RecordError(f"p={tags.get('p', '(missing)')}"
                              + (f" sp={tags['sp']}" if "sp" in tags else "")
                              + " is not none, quarantine or reject, and there is no rua=")
        policy, subdomain = "none", None
    percent_text = tags.get("pct", "100")
    percent = int(percent_text) if percent_text.isdigit() else 100
    return DmarcRecord(policy=policy, subdomain_policy=subdomain,
                       strict_dkim=tags.get("adkim", "r").lower() == "s",
                       strict_spf=tags.get("aspf", "r").lower() == "s",
                       percent=min(percent, 100), rua=rua, text=text)


@dataclass(frozen=True)
class FromDomain:
    domain: str | None  # the RFC5322.From domain in A-labels
    problem: str = ""  # why there is none (6.6.1: permerror)


def author_domains(from_values: Iterable[str]) -> list[FromDomain]:
    """6.6.1: the author domain of every address in every From header field, each once.
    RFC 5322 allows one From field (several addresses only with a Sender), but a message
    breaking that is judged domain by domain and the strictest policy applies (the choice
    6.6.1 leaves to receivers besides rejecting): a forged From prepended over another
    domain's signed message is then judged by the forged domain's own policy. A field or
    address without a usable domain is one author with none (a permerror)."""
    values = list(from_values)
    if not values:
        return [FromDomain(None, "no From header")]
    found: list[FromDomain] = []
    for value in values:
        addresses = [a for _, a in getaddresses([value.replace("\r\n", "").replace("\n", "")])
                     if a]
        if not addresses:
            found.append(FromDomain(None, "From holds 0 addresses"))
        found.extend(_author(address) for address in addresses)
    return list(dict.fromkeys(found))


def _author(address: str) -> FromDomain:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or "." not in domain.strip("."):
        return FromDomain(None, f"From address <{address}> has no usable domain")
    try:
        return FromDomain(to_ascii(domain))
    except ValueError as exc:
        return FromDomain(None, str(exc))


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass, fail, none, temperror, permerror
    domain: str = ""  # header.from
    policy: str = "none"  # the policy that applies (p or sp), as published
    disposition: str = "none"  # what the domain asks for this message after pct= (6.6.4)
    record: DmarcRecord | None = None
    sampled_out: bool = False  # pct= let this failing message off one level
    reason: str = ""
    dkim_aligned: tuple[str, ...] = field(default=())  # d= of passing aligned signatures
    spf_aligned: bool = False


def find_record(domain: str, lookup: TxtLookup) -> tuple[DmarcRecord | None, str, str]:
    """6.6.3: the record at _dmarc.DOMAIN, else at the organisational domain.
    Returns (record, where it was found, problem). Raises DnsTempError, RecordError."""
    for candidate in dict.fromkeys([domain, organizational_domain(domain)]):
        texts = [t.decode("utf-8", "replace") for t in lookup(f"_dmarc.{candidate}")]
        records = [t for t in texts if t.replace(" ", "").startswith("v=DMARC1")]
        if len(records) > 1:
            raise RecordError(f"_dmarc.{candidate} has {len(records)} DMARC records")
        if records:
            return parse_record(records[0]), candidate, ""
    return None, "", ""


def evaluate(from_header: FromDomain, spf: SpfResult | None, dkim: list[DkimResult],
             lookup: TxtLookup, sample: Callable[[], float] = random.random) -> DmarcResult:
    if from_header.domain is None:
        return DmarcResult("permerror", reason=from_header.problem)
    domain = from_header.domain
    try:
        record, found_at, _ = find_record(domain, lookup)
    except DnsTempError as exc:
        return DmarcResult("temperror", domain, reason=str(exc))
    except RecordError as exc:
        return DmarcResult("permerror", domain, reason=str(exc))
    if record is None:
        return DmarcResult("none", domain, reason="no DMARC record")
    # 6.6.3: sp= applies when the record came from the organisational domain above us.
    policy = record.policy
    if found_at != domain and record.subdomain_policy is not None:
        policy = record.subdomain_policy
    dkim_aligned = tuple(d.domain for d in dkim if d.result == "pass"
                         and aligned(d.domain, domain, record.strict_dkim))
    spf_aligned = (spf is not None and spf.result == "pass"
                   and aligned(spf.domain, domain, record.strict_spf))
    made = dict(domain=domain, policy=policy, record=record, dkim_aligned=dkim_aligned,
                spf_aligned=spf_aligned)
    if dkim_aligned or spf_aligned:
        return DmarcResult("pass", disposition="none", **made)
    # An aligned check that could not finish might have passed: ask again later.
    unsure = [d for d in dkim if d.result == "temperror"
              and aligned(d.domain, domain, record.strict_dkim)]
    if spf is not None and spf.result == "temperror" and aligned(spf.domain, domain,
                                                                  record.strict_spf):
        return DmarcResult("temperror", reason="SPF temperror for an aligned domain", **made)
    if unsure:
        return DmarcResult("temperror", reason="DKIM temperror for an aligned signature",
                           **made)
    disposition, sampled_out = policy, False
    if record.percent < 100 and sample() * 100 >= record.percent:
        # 6.6.4: outside the sample, the next less strict policy applies.
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
        sampled_out = True
    return DmarcResult("fail", disposition=disposition, sampled_out=sampled_out,
                       reason="no aligned SPF or DKIM pass", **made)
