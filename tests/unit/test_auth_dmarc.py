"""DMARC (RFC 7489) as the auth milter evaluates it: organisational domains, alignment, the
policy record, the RFC5322.From domain and the final result and disposition.

DNS is a dict: name -> TXT strings, or an exception to raise. Section numbers in the
docstrings are RFC 7489's unless another RFC is named.
"""
from __future__ import annotations

from typing import Callable

import pytest

from milters.auth.dkim_check import DkimResult
from milters.auth.dmarc import (DmarcRecord, FromDomain, RecordError, aligned, evaluate,
                                author_domains, organizational_domain, parse_record)
from milters.auth.spf import SpfResult
from milters.core.dns import DnsTempError

Zone = dict[str, "list[str] | Exception"]


def lookup_from(zone: Zone) -> Callable[[str], list[bytes]]:
    """A TxtLookup over a dict; names compare without case or trailing dot, as in DNS."""
    table = {name.lower().rstrip("."): value for name, value in zone.items()}

    def lookup(name: str) -> list[bytes]:
        value = table.get(name.lower().rstrip("."), [])
        if isinstance(value, Exception):
            raise value
        return [text.encode() for text in value]
    return lookup


def dkim_pass(domain: str) -> DkimResult:
    return DkimResult("pass", domain, "sel", "rsa-sha256", "abcdefgh")


def spf(result: str, domain: str) -> SpfResult:
    return SpfResult(result, "mailfrom", domain)


def never_sampled_out() -> float:
    """A sample below every pct=: the policy always applies."""
    return 0.0


# --- 3.2 organisational domain -------------------------------------------------------------


@pytest.mark.parametrize("domain, expected", [
    ("mail.example.co.jp", "example.co.jp"),  # co.jp is a public suffix
    ("a.b.example.com", "example.com"),
    ("MAIL.Example.COM.", "example.com"),  # DNS names compare without case or root dot
    ("example.co.jp", "example.co.jp"),
])
def test_organizational_domain_is_public_suffix_plus_one_label(domain: str,
                                                                expected: str) -> None:
    """RFC 7489 3.2: the Organizational Domain is the public suffix plus one label."""
    assert organizational_domain(domain) == expected


def test_organizational_domain_honours_psl_wildcard_and_exception() -> None:
    """RFC 7489 3.2 with the PSL's ICANN section: `*.kawasaki.jp` makes every child of
    kawasaki.jp a public suffix, but `!city.kawasaki.jp` excepts the city's own domain, so
    the city's hosts share city.kawasaki.jp while other children each stand alone."""
    assert organizational_domain("www.city.kawasaki.jp") == "city.kawasaki.jp"
    assert organizational_domain("city.kawasaki.jp") == "city.kawasaki.jp"
    # The wildcard: foo.kawasaki.jp is itself a suffix, so the org domain has one more label.
    assert organizational_domain("www.shop.foo.kawasaki.jp") == "shop.foo.kawasaki.jp"


def test_organizational_domain_of_idn_a_labels() -> None:
    """RFC 7489 3.2 on A-labels (DNS form): 例え.jp is xn--r8jz45g.jp under the jp suffix,
    and an IDN TLD (中国 = xn--fiqs8s) is a public suffix like any other."""
    assert organizational_domain("mail.xn--r8jz45g.jp") == "xn--r8jz45g.jp"
    assert organizational_domain("www.shop.xn--fiqs8s") == "shop.xn--fiqs8s"


# --- 3.1 identifier alignment --------------------------------------------------------------


def test_strict_alignment_needs_the_exact_domain() -> None:
    """RFC 7489 3.1.1/3.1.2 strict mode: only an identical domain (case aside) aligns."""
    assert aligned("example.com", "EXAMPLE.com.", strict=True)
    assert not aligned("mail.example.com", "example.com", strict=True)
    assert not aligned("example.com", "news.example.com", strict=True)


def test_relaxed_alignment_needs_the_same_organizational_domain() -> None:
    """RFC 7489 3.1.1/3.1.2 relaxed mode: same Organizational Domain, subdomains either way,
    but never a sibling under a public suffix."""
    assert aligned("mail.example.com", "example.com", strict=False)
    assert aligned("example.com", "news.example.com", strict=False)
    assert aligned("a.example.co.jp", "b.example.co.jp", strict=False)
    assert not aligned("example.co.jp", "other.co.jp", strict=False)
    assert not aligned("example.com", "example.net", strict=False)
    assert not aligned("attacker-example.com", "example.com", strict=False)


# --- 6.3 / 6.4 / 6.6.3 the policy record ---------------------------------------------------


def test_parse_record_reads_every_tag() -> None:
    """RFC 7489 6.3: p, sp, adkim, aspf, pct and rua as published."""
    record = parse_record("v=DMARC1; p=reject; sp=quarantine; adkim=s; aspf=s; pct=25; "
                          "rua=mailto:dmarc@example.com")
    assert (record.policy, record.subdomain_policy) == ("reject", "quarantine")
    assert record.strict_dkim and record.strict_spf
    assert record.percent == 25
    assert record.rua == ("mailto:dmarc@example.com",)


def test_parse_record_defaults() -> None:
    """RFC 7489 6.3: adkim and aspf default to relaxed, pct to 100, sp to p."""
    record = parse_record("v=DMARC1; p=none")
    assert record == DmarcRecord(policy="none", text="v=DMARC1; p=none")
    assert not record.strict_dkim and not record.strict_spf and record.percent == 100
    assert record.subdomain_policy is None


def test_parse_record_tolerates_case_and_spacing() -> None:
    """RFC 7489 6.4: the ABNF allows whitespace around '=' and ';', and ABNF literals
    (tag names and keywords such as p's values) are case-insensitive (RFC 5234 2.3)."""
    record = parse_record("v = DMARC1 ;P=Reject;  ADKIM = S;aspf=s ; PcT = 50 ;")
    assert record.policy == "reject"
    assert record.strict_dkim and record.strict_spf
    assert record.percent == 50


@pytest.mark.parametrize("text", [
    "p=reject; v=DMARC1",  # v= not first
    "v=DMARC2; p=reject",  # not this version
    "v=dmarc1; p=reject",  # 6.4: the version's value is case-sensitive (%x44 ...)
    "p=reject",  # no v= at all
])
def test_record_without_leading_v_dmarc1_is_refused(text: str) -> None:
    """RFC 7489 6.3/6.4: v=DMARC1 must be present, first and exact."""
    with pytest.raises(RecordError):
        parse_record(text)


def test_unusable_p_with_rua_is_read_as_p_none() -> None:
    """RFC 7489 6.6.3: a record without a valid p= but with a rua= is treated as p=none (so
    reports still flow); an invalid sp= is handled the same way."""
    record = parse_record("v=DMARC1; p=block; rua=mailto:agg@example.com")
    assert record.policy == "none" and record.subdomain_policy is None
    sp_bad = parse_record("v=DMARC1; p=reject; sp=maybe; rua=mailto:agg@example.com")
    assert sp_bad.policy == "none"


@pytest.mark.parametrize("text", [
    "v=DMARC1; p=block",
    "v=DMARC1",  # p= missing
    "v=DMARC1; p=reject; sp=maybe",
])
def test_unusable_p_without_rua_is_an_error(text: str) -> None:
    """RFC 7489 6.6.3: without a rua= an invalid p= (or sp=) leaves nothing to apply."""
    with pytest.raises(RecordError):
        parse_record(text)


@pytest.mark.parametrize("pct", ["150", "-5", "abc", "50.5", ""])
def test_invalid_pct_falls_back_to_100(pct: str) -> None:
    """RFC 7489 6.3: pct is an integer 0..100; a syntax error in a tag other than v and p is
    discarded in favour of the default (100), so the policy is applied in full."""
    assert parse_record(f"v=DMARC1; p=reject; pct={pct}").percent == 100


def test_pct_zero_is_kept() -> None:
    """RFC 7489 6.3: pct=0 is valid (policy applied to no message)."""
    assert parse_record("v=DMARC1; p=reject; pct=0").percent == 0


# --- 6.6.1 the RFC5322.From domain ---------------------------------------------------------


def test_from_domain_of_one_from() -> None:
    """RFC 7489 6.6.1: the domain of the single From address."""
    assert author_domains(["Alice <alice@Example.JP>"]) == [FromDomain("example.jp")]


def test_no_from_header_has_no_domain() -> None:
    """RFC 7489 6.6.1: no From field: no identifier to evaluate (a problem to report)."""
    (result,) = author_domains([])
    assert result.domain is None and "no From" in result.problem


def test_two_from_headers_give_each_author_domain() -> None:
    """RFC 7489 6.6.1: RFC 5322 3.6 allows one From, but a receiver may apply DMARC to each
    author domain of a message that has more; both domains are evaluated, each once."""
    assert author_domains(["a@example.jp", "b@example.org", "c@Example.JP"]) == [
        FromDomain("example.jp"), FromDomain("example.org")]


def test_two_addresses_in_one_from_give_each_author_domain() -> None:
    """RFC 7489 6.6.1: a From with several addresses (RFC 5322 3.6.2), or a group syntax
    hiding two, is judged per author domain too."""
    for value in ("a@example.jp, b@example.org", "Team: a@example.jp, b@example.org;"):
        assert author_domains([value]) == [FromDomain("example.jp"), FromDomain("example.org")]


def test_an_author_without_domain_beside_one_with_is_kept() -> None:
    """RFC 7489 6.6.1: an address with no usable domain among others is a bad author of its
    own (a permerror), not silently dropped in favour of the good one."""
    found = author_domains(["ceo@example.jp, nobody"])
    assert found[0] == FromDomain("example.jp")
    assert found[1].domain is None and "nobody" in found[1].problem


@pytest.mark.parametrize("value", ["alice", "Alice <alice>", "<>", "Undisclosed:;"])
def test_from_without_domain_has_no_domain(value: str) -> None:
    """RFC 7489 6.6.1: an address without a domain gives nothing to look up."""
    (result,) = author_domains([value])
    assert result.domain is None and result.problem


def test_from_with_rfc2047_display_name() -> None:
    """RFC 7489 6.6.1 with RFC 2047 display names (as Japanese mailers send them): the
    encoded words are only the phrase; the address after them decides."""
    assert author_domains(["=?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <yamada@example.jp>"]) \
        == [FromDomain("example.jp")]
    assert author_domains(["=?utf-8?q?Doe=2C_John?= <john@example.org>"]) \
        == [FromDomain("example.org")]


def test_from_display_name_that_looks_like_an_address_is_not_the_domain() -> None:
    """RFC 7489 6.6.1: the address, not a display name made to look like one, is the
    author; otherwise anyone could claim a bank's domain."""
    assert author_domains(['"ceo@bank.example" <a@evil.test>']) == [FromDomain("evil.test")]


def test_from_idn_domain_becomes_a_label() -> None:
    """RFC 7489 6.6.1 with RFC 6532 (UTF-8 headers): the DMARC record of 例え.jp is at
    _dmarc.xn--r8jz45g.jp, so the domain is given as its A-label."""
    assert "例え.jp".encode("idna") == b"xn--r8jz45g.jp"
    assert author_domains(["ユーザー@例え.jp"]) == [FromDomain("xn--r8jz45g.jp")]


def test_from_idn_domain_uses_idna2008_a_label() -> None:
    """RFC 7489 6.6.1 with RFC 5890/5891 (IDNA2008, what registries and DNS use): straße.de
    is xn--strae-oqa.de, a different domain from strasse.de (IDNA2003 mapped ß to ss).
    The From domain must be the name whose DMARC record DNS holds (to_ascii's docstring)."""
    assert author_domains(["user@straße.de"]) == [FromDomain("xn--strae-oqa.de")]


def test_folded_from_header() -> None:
    """RFC 7489 6.6.1 on RFC 5322 2.2.3 folding: the unfolded value is what counts."""
    assert author_domains(["Alice Example\r\n <alice@example.jp>"]) == [FromDomain("example.jp")]
    assert author_domains(["\"Alice\"\n\t<alice@example.org>"]) == [FromDomain("example.org")]


# --- 6.6.2 / 6.6.3 / 6.6.4 evaluation --------------------------------------------------------

REJECT = {"_dmarc.victim.test": ["v=DMARC1; p=reject"]}


def test_pass_by_aligned_dkim() -> None:
    """RFC 7489 4.2: an aligned DKIM pass is a DMARC pass."""
    result = evaluate(FromDomain("victim.test"), spf("fail", "elsewhere.test"),
                      [dkim_pass("victim.test")], lookup_from(REJECT))
    assert result.result == "pass"
    assert result.dkim_aligned == ("victim.test",) and not result.spf_aligned
    assert result.disposition == "none"


def test_pass_by_aligned_spf() -> None:
    """RFC 7489 4.2: an aligned SPF pass is a DMARC pass even without DKIM."""
    result = evaluate(FromDomain("victim.test"), spf("pass", "victim.test"), [],
                      lookup_from(REJECT))
    assert result.result == "pass" and result.spf_aligned


def test_replayed_signature_from_another_domain_fails() -> None:
    """RFC 7489 3.1.1/4.2: a valid DKIM signature by attacker.test says nothing about a
    From of victim.test; an SPF pass for attacker.test neither."""
    result = evaluate(FromDomain("victim.test"), spf("pass", "attacker.test"),
                      [dkim_pass("attacker.test")], lookup_from(REJECT), never_sampled_out)
    assert result.result == "fail"
    assert result.policy == "reject" and result.disposition == "reject"
    assert result.dkim_aligned == () and not result.spf_aligned


def test_relaxed_alignment_passes_subdomain_signature() -> None:
    """RFC 7489 3.1.1: adkim=r (the default) accepts d=mail.example.com for example.com."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=reject"]}
    result = evaluate(FromDomain("example.com"), None, [dkim_pass("mail.example.com")],
                      lookup_from(zone))
    assert result.result == "pass" and result.dkim_aligned == ("mail.example.com",)


def test_strict_alignment_fails_subdomain_signature() -> None:
    """RFC 7489 3.1.1: adkim=s needs d= to equal the From domain exactly."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=reject; adkim=s"]}
    result = evaluate(FromDomain("example.com"), None, [dkim_pass("mail.example.com")],
                      lookup_from(zone), never_sampled_out)
    assert result.result == "fail" and result.disposition == "reject"


def test_strict_spf_alignment_fails_subdomain_mail_from() -> None:
    """RFC 7489 3.1.2: aspf=s needs the MAIL FROM domain to equal the From domain."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=quarantine; aspf=s"]}
    result = evaluate(FromDomain("example.com"), spf("pass", "bounce.example.com"), [],
                      lookup_from(zone), never_sampled_out)
    assert result.result == "fail" and result.disposition == "quarantine"


def test_org_domain_record_applies_sp_to_a_subdomain_from() -> None:
    """RFC 7489 6.6.3: with no record at the From domain, the Organizational Domain's record
    applies, and its sp= (not p=) governs the subdomain."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=none; sp=reject"]}
    result = evaluate(FromDomain("news.example.com"), None, [], lookup_from(zone),
                      never_sampled_out)
    assert result.result == "fail"
    assert result.policy == "reject" and result.disposition == "reject"
    # At the organisational domain itself p= rules, not sp=.
    own = evaluate(FromDomain("example.com"), None, [], lookup_from(zone), never_sampled_out)
    assert own.policy == "none" and own.disposition == "none"


def test_org_domain_record_without_sp_applies_p() -> None:
    """RFC 7489 6.3: sp= absent means the subdomain gets p=."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=quarantine"]}
    result = evaluate(FromDomain("news.example.com"), None, [], lookup_from(zone),
                      never_sampled_out)
    assert result.policy == "quarantine" and result.disposition == "quarantine"


def test_record_at_from_domain_wins_over_org_domain() -> None:
    """RFC 7489 6.6.3: the Organizational Domain is only asked when the From domain has
    no record."""
    zone = {"_dmarc.news.example.com": ["v=DMARC1; p=none"],
            "_dmarc.example.com": ["v=DMARC1; p=reject; sp=reject"]}
    result = evaluate(FromDomain("news.example.com"), None, [], lookup_from(zone),
                      never_sampled_out)
    assert result.policy == "none" and result.disposition == "none"


def test_no_record_is_none() -> None:
    """RFC 7489 6.6.3/11.2: no policy record anywhere: dmarc=none, nothing to enforce."""
    zone = {"_dmarc.example.com": ["v=spf1 -all"]}  # a TXT record that is not DMARC
    result = evaluate(FromDomain("example.com"), None, [], lookup_from(zone))
    assert result.result == "none" and result.record is None
    assert result.disposition == "none"


def test_two_dmarc_records_are_a_permerror() -> None:
    """RFC 7489 6.6.3: several DMARC records end policy discovery (no policy applies);
    reported as permerror (11.2), never as one of the two policies."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=none", "v=DMARC1; p=reject"]}
    result = evaluate(FromDomain("example.com"), None, [], lookup_from(zone))
    assert result.result == "permerror"
    assert result.disposition == "none"


def test_broken_record_is_a_permerror() -> None:
    """RFC 7489 11.2: a syntactically unusable record is a permerror."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=block"]}
    result = evaluate(FromDomain("example.com"), None, [], lookup_from(zone))
    assert result.result == "permerror" and result.domain == "example.com"


def test_bad_from_is_a_permerror_without_dns() -> None:
    """RFC 7489 6.6.1: no usable From domain: permerror, and nothing is looked up."""
    def no_dns(name: str) -> list[bytes]:
        raise AssertionError(f"looked up {name}")
    result = evaluate(FromDomain(None, "2 From headers"), None, [], no_dns)
    assert result.result == "permerror" and "2 From headers" in result.reason


def test_dns_temp_error_is_temperror() -> None:
    """RFC 7489 6.6.3/11.2: a policy that cannot be fetched now: temperror (try later)."""
    zone: Zone = {"_dmarc.example.com": DnsTempError("SERVFAIL")}
    result = evaluate(FromDomain("example.com"), None, [], lookup_from(zone))
    assert result.result == "temperror"


def test_dns_temp_error_at_org_domain_is_temperror() -> None:
    """RFC 7489 6.6.3: the fallback query to the Organizational Domain failing is as
    much a temperror as the first one."""
    zone: Zone = {"_dmarc.example.com": DnsTempError("timeout")}
    result = evaluate(FromDomain("news.example.com"), None, [], lookup_from(zone))
    assert result.result == "temperror"


def test_spf_temperror_on_aligned_domain_is_temperror() -> None:
    """RFC 7489 6.6.2/11.2: an aligned SPF check that could not finish might have passed,
    so without any pass the result is temperror, not fail."""
    result = evaluate(FromDomain("victim.test"), spf("temperror", "victim.test"), [],
                      lookup_from(REJECT), never_sampled_out)
    assert result.result == "temperror"
    # An unaligned temperror changes nothing: a plain fail.
    other = evaluate(FromDomain("victim.test"), spf("temperror", "attacker.test"), [],
                     lookup_from(REJECT), never_sampled_out)
    assert other.result == "fail"


def test_pct_zero_samples_out_one_level_down() -> None:
    """RFC 7489 6.6.4: a message outside pct= gets the next less strict policy:
    reject -> quarantine, quarantine -> none."""
    zone = {"_dmarc.a.test": ["v=DMARC1; p=reject; pct=0"],
            "_dmarc.b.test": ["v=DMARC1; p=quarantine; pct=0"]}
    for domain, expected in (("a.test", "quarantine"), ("b.test", "none")):
        result = evaluate(FromDomain(domain), None, [], lookup_from(zone), lambda: 0.5)
        assert result.result == "fail"
        assert result.disposition == expected and result.sampled_out


def test_pct_100_applies_full_disposition() -> None:
    """RFC 7489 6.6.4: pct=100 applies the policy to every failing message."""
    zone = {"_dmarc.a.test": ["v=DMARC1; p=reject; pct=100"]}
    result = evaluate(FromDomain("a.test"), None, [], lookup_from(zone), lambda: 0.999)
    assert result.result == "fail"
    assert result.disposition == "reject" and not result.sampled_out


def test_pct_50_inside_the_sample_applies_policy() -> None:
    """RFC 7489 6.6.4: a message chosen for the sample gets the full policy."""
    zone = {"_dmarc.a.test": ["v=DMARC1; p=reject; pct=50"]}
    inside = evaluate(FromDomain("a.test"), None, [], lookup_from(zone), lambda: 0.2)
    outside = evaluate(FromDomain("a.test"), None, [], lookup_from(zone), lambda: 0.7)
    assert (inside.disposition, inside.sampled_out) == ("reject", False)
    assert (outside.disposition, outside.sampled_out) == ("quarantine", True)
