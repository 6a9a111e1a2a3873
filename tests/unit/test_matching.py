"""SaMMA-style address and network matching, with property tests for the parsers."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milters.core.policy.matching import (match_address, match_network, network_matches,
                                          normalize_address, normalize_domain,
                                          parse_address_pattern,
                                          parse_network_pattern)


def patterns(*texts: str):  # type: ignore[no-untyped-def]
    return [parse_address_pattern(t) for t in texts]


@pytest.mark.parametrize("address, expected, decided_by", [
    ("taro@example.jp", True, "@example.jp"),              # domain
    ("taro@sales.example.jp", True, "@example.jp"),        # parent domain covers subdomains
    ("hanako@hr.example.jp", False, "!@hr.example.jp"),    # excluded subdomain
    ("boss@hr.example.jp", True, "boss@hr.example.jp"),    # exact address beats the exclusion
    ("x@deep.hr.example.jp", False, "!@hr.example.jp"),    # exclusion covers its subdomains
    ("Taro@EXAMPLE.JP.", True, "@example.jp"),             # case and trailing dot
    ("taro@example.com", False, None),
    ("", False, None),                                     # the null sender matches no domain
])
def test_most_specific_level_decides(address: str, expected: bool, decided_by: str | None) -> None:
    result = match_address(address, patterns("@example.jp", "!@hr.example.jp",
                                             "boss@hr.example.jp"))
    assert result.matched is expected
    assert (str(result.pattern) if result.pattern else None) == decided_by


def test_negation_wins_at_the_same_level() -> None:
    result = match_address("a@example.jp", patterns("@example.jp", "!@example.jp"))
    assert not result.matched and str(result.pattern) == "!@example.jp"


def test_star_matches_everything_else_and_null_sender() -> None:
    assert match_address("", patterns("*")).matched
    assert match_address("a@b.example", patterns("*", "!@b.example")).matched is False
    assert match_address("a@c.example", patterns("*", "!@b.example")).matched


def test_idn_domains_match_their_ascii_form() -> None:
    assert match_address("info@例え.jp", patterns("@xn--r8jz45g.jp")).matched
    assert match_address("info@xn--r8jz45g.jp", patterns("@例え.jp")).matched


@pytest.mark.parametrize("text, problem", [
    ("example.jp", "a domain needs a leading '@'"),
    ("@", None),
    ("user@", "write an address as user@example.jp"),
    ("us er@example.jp", "has no spaces"),
    ("@.example.jp", "write a domain as @example.jp"),
])
def test_pattern_parse_errors_say_how_to_write_it(text: str, problem: str | None) -> None:
    if problem is None:
        assert parse_address_pattern(text).kind == "any"
        return
    with pytest.raises(ValueError, match=problem):
        parse_address_pattern(text)


def test_longest_prefix_decides_and_negation_wins_ties() -> None:
    nets = [parse_network_pattern(t) for t in
            ("192.0.2.0/24", "!192.0.2.128/25", "192.0.2.200/32", "2001:db8::/32")]
    assert network_matches(ipaddress.ip_address("192.0.2.5"), nets)
    assert not network_matches(ipaddress.ip_address("192.0.2.130"), nets)
    assert network_matches(ipaddress.ip_address("192.0.2.200"), nets)
    assert network_matches(ipaddress.ip_address("2001:db8::1"), nets)
    assert match_network(ipaddress.ip_address("198.51.100.1"), nets) is None
    tie = [parse_network_pattern("10.0.0.0/8"), parse_network_pattern("!10.0.0.0/8")]
    assert not network_matches(ipaddress.ip_address("10.1.1.1"), tie)


labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=2, max_size=4).map(".".join)
locals_ = st.from_regex(r"[A-Za-z0-9._+-]{1,20}", fullmatch=True)


@given(local=locals_, domain=domains)
def test_an_address_always_matches_its_own_domain_and_itself(local: str, domain: str) -> None:
    address = f"{local}@{domain}"
    assert match_address(address, patterns(f"@{domain}")).matched
    assert match_address(address.upper(), patterns(address)).matched
    parent = domain.split(".", 1)[1]
    assert match_address(address, patterns(f"@{parent}")).matched
    assert not match_address(address, patterns(f"@{parent}", f"!@{domain}")).matched


@given(local=locals_, domain=domains)
def test_normalizing_is_idempotent(local: str, domain: str) -> None:
    once = normalize_address(f"<{local}@{domain.upper()}.>")
    assert normalize_address(once) == once


@given(st.text(max_size=40))
def test_pattern_parser_never_crashes(text: str) -> None:
    for parse in (parse_address_pattern, parse_network_pattern):
        try:
            parse(text)
        except ValueError:
            pass


@pytest.mark.parametrize("domain, canonical", [
    ("例え.jp", "xn--r8jz45g.jp"),
    ("XN--R8JZ45G.JP.", "xn--r8jz45g.jp"),
    ("Example.JP.", "example.jp"),
    ("straße.de", "xn--strae-oqa.de"),  # IDNA 2008; Python's IDNA 2003 codec said strasse.de
    ("exаmple.jp", "xn--exmple-4nf.jp"),  # a Cyrillic а: a domain of its own
    ("ＥＸＡＭＰＬＥ．ｊｐ", "example.jp"),  # UTS 46 maps full-width forms, as mail clients do
])
def test_domains_are_compared_as_idna_2008_a_labels(domain: str, canonical: str) -> None:
    assert normalize_domain(domain) == canonical


def test_a_name_idna_2008_refuses_matches_no_ascii_domain() -> None:
    assert not normalize_domain("snow☃.example.jp").isascii()
