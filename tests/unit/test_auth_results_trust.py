"""Issue 13 section 1: later milters trust what the auth milter decided, and nothing the client
wrote. Our Authentication-Results is composed, then read back with the RFC 8601 parser the
later milters use (milters.core.auth_results over authres); a hostile HELO, MAIL FROM, From
domain, DKIM tag or SPF explanation never changes what is read, a header of ours that does
not parse is trusted for nothing, and SPF for MAIL FROM and for HELO stay apart.
"""
from __future__ import annotations

import re
import string
import time

import authres
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milters.auth.dkim_check import ArcResult, DkimResult
from milters.auth.dmarc import DmarcRecord, DmarcResult
from milters.auth.results_header import AuthResults, comment, compose, forged_indexes
from milters.auth.spf import SpfResult
from milters.core.auth_results import (HEADER, authserv_id_of, dmarc_domain,
                                       encode_value, parse, read, trusted_results, verdicts)
from milters.core.message import Envelope, Message
from milters.core.policy.document import load_policy_text
from milters.neutralize.decide import decide
from mta.cli import EXTENSIONS

OURS = "mx.example.net"

# Text a client may choose: RFC 8601 and RFC 5322 specials, line breaks, escapes, non-ASCII.
_PIECES = st.one_of(st.sampled_from(list(';="()\\\r\n\t %@.<>[]:,') + [
    "dmarc=pass", "spf=pass", " header.from=bank.example", "\u00e9", "\u4f8b", "\U0001f600",
    "\x00", "\x7f"]), st.characters(blacklist_categories=("Cs",)))
HOSTILE = st.lists(_PIECES, max_size=20).map("".join)
SPF = st.sampled_from(["pass", "fail", "softfail", "neutral", "none", "temperror",
                       "permerror"])
DKIM = st.sampled_from(["pass", "fail", "policy", "neutral", "temperror", "permerror"])
DMARC = st.sampled_from(["pass", "fail", "none", "temperror", "permerror"])
# (temperror: a DNS timeout on a seal's key; the auth milter writes it, so it must read back)
ARC = st.sampled_from(["pass", "fail", "none", "temperror", "permerror"])


def header(value: str) -> list[tuple[str, str]]:
    return [(HEADER, value)]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(helo=HOSTILE, mail_from=HOSTILE, from_domain=HOSTILE, explanation=HOSTILE,
       null_sender=st.booleans(), spf=SPF, helo_spf=SPF, dkim=st.lists(DKIM, max_size=3),
       dmarc=DMARC, arc=ARC, second_author=st.one_of(st.none(), HOSTILE), second=DMARC)
def test_compose_then_read_gives_exactly_the_decided_verdicts(
        helo: str, mail_from: str, from_domain: str, explanation: str, null_sender: bool,
        spf: str, helo_spf: str, dkim: list[str], dmarc: str, arc: str,
        second_author: str | None, second: str) -> None:
    """For any HELO, MAIL FROM domain and From domain (also as DKIM d=/s=/b=, SPF and DKIM
    explanations, an ARC sealer and a second author), the header reads back as exactly the
    verdicts decided, and every value as exactly the text given."""
    if null_sender:  # RFC 7208 2.4: the HELO check is the MAIL FROM check
        spf_result, helo_result = SpfResult(spf, "helo", helo, explanation), None
    else:
        spf_result = SpfResult(spf, "mailfrom", mail_from, explanation)
        helo_result = SpfResult(helo_spf, "helo", helo, explanation)
    signatures = [DkimResult(r, from_domain, helo, "rsa-sha256", mail_from[:8],
                             reason=explanation) for r in dkim]
    first = DmarcResult(dmarc, from_domain, "reject", "reject", DmarcRecord("reject"),
                        reason=explanation)
    each = (first, DmarcResult(second, second_author, reason=explanation)) \
        if second_author is not None else ()
    results = AuthResults(spf_result, helo_result, signatures,
                          ArcResult(arc, (from_domain,) if from_domain else ()), first, each)
    value = compose(OURS, results)

    expected = {"spf": spf, "spf_helo": spf if null_sender else helo_spf, "arc": arc,
                "dkim": min(dkim, key=["pass", "policy", "neutral", "none", "fail",
                                       "temperror", "permerror"].index) if dkim else "none"}
    dmarcs = [dmarc] + ([second] if each else [])
    expected["dmarc"] = min(dmarcs, key=["fail", "permerror", "temperror", "none",
                                         "pass"].index)
    found = read(header(value), OURS)
    assert found is not None and found.unreadable == "", (value, found)
    assert found.methods == expected, value
    assert dmarc_domain(header(value), OURS) == (
        from_domain.lower().rstrip(".") or None if not each else None)
    # Every value reads back as given (CR, LF, NUL and non-ASCII included).
    _, infos = parse(value)
    identity = "smtp.helo" if null_sender else "smtp.mailfrom"
    assert infos[0].values(identity) == [helo if null_sender else mail_from]
    if not null_sender:
        assert infos[1].values("smtp.helo") == [helo]
    for info in (i for i in infos if i.method == "dkim" and i.result != "none"):
        assert info.values("header.d") == ([from_domain] if from_domain else [])
        assert info.values("header.s") == ([helo] if helo else [])
    # Plain ASCII, every line break a fold, every line within RFC 5322's 998 characters.
    assert value.isascii() and not re.search(r"\n(?![\t ])", value) and "\r" not in value
    assert all(len(line) <= 998 for line in value.split("\n"))
    # The stock authres reader (dkimpy's, when sealing ARC) sees the same results.
    stock = authres.AuthenticationResultsHeader.parse_value(value.replace("\n", "\r\n"))
    assert [(r.method, r.result) for r in stock.results] == [(i.method, i.result)
                                                             for i in infos]


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_every_value_round_trips(text: str) -> None:
    """encode_value writes a token or a quoted-string that reads back as the same text."""
    encoded = encode_value(text)
    assert encoded.isascii()
    _, infos = parse(f"{OURS}; dmarc=fail header.from={encoded}")
    assert infos[0].values("header.from") == [text]


# --- the attacks of issue 13, one by one -----------------------------------------------------
ATTACKS = [
    ("helo", 'x; dmarc=pass header.from=bank.example'),
    ("helo", 'x" ; dmarc=pass header.from=bank.example ; x="'),
    ("helo", "(dmarc=pass)"),
    ("helo", "x\r\n\t; dmarc=pass header.from=bank.example"),
    ("mail_from", "bank.example;dmarc=pass"),
    ("mail_from", 'bank.example" ; dmarc=pass ; spf=pass smtp.mailfrom="x'),
    ("from", "bank.example (dmarc=pass)"),
    ("from", "bank.example\\\"; dmarc=pass"),
    ("explanation", ") ; dmarc=pass header.from=bank.example ("),
]


@pytest.mark.parametrize("field,text", ATTACKS)
def test_client_text_never_changes_what_a_later_milter_reads(field: str, text: str) -> None:
    """The old reader split the header at ';' outside comments but inside quotes, so a HELO
    of 'x; dmarc=pass header.from=bank.example' read as a DMARC pass for bank.example, and
    neutralize let a trusted-domain forgery through untouched."""
    helo = text if field == "helo" else "mail.evil.test"
    mail_from = text if field == "mail_from" else "evil.test"
    domain = text if field == "from" else "bank.example"
    why = text if field == "explanation" else "no aligned SPF or DKIM pass"
    results = AuthResults(SpfResult("fail", "mailfrom", mail_from, why),
                          SpfResult("pass", "helo", helo, why),
                          [DkimResult("fail", domain, helo, "rsa-sha256", "x", reason=why)],
                          ArcResult("none"),
                          DmarcResult("fail", domain, "reject", "reject", DmarcRecord("reject"),
                                      reason=why))
    value = compose(OURS, results)
    assert verdicts(header(value), OURS) == {"spf": "fail", "spf_helo": "pass",
                                             "dkim": "fail", "arc": "none", "dmarc": "fail"}
    assert dmarc_domain(header(value), OURS) == domain.lower()
    policy = load_policy_text(NEUTRALIZE, EXTENSIONS)
    raw = f"{HEADER}: {value}\r\nSubject: hi\r\n\r\nbody\r\n".replace("\n\t", "\r\n\t")
    message = Message(raw=raw.encode(), envelope=Envelope(client_ip="198.51.100.1",
                                                          mail_from=f"a@{mail_from}"))
    assert decide(policy, message, OURS).why == "dmarc-not-passing"


NEUTRALIZE = """\
neutralize:
  trusted_domains: [bank.example]
rules:
  - name: dmarc-not-passing
    when: {auth: {dmarc: [fail, none, permerror, temperror]}}
    then: {neutralize: neutralize}
defaults:
  neutralize: pass
"""


# --- fail closed -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    f'{OURS}; dmarc=pass header.from="bank.example',  # unterminated quoted-string
    f"{OURS}; dmarc=pass (unclosed header.from=bank.example",  # unterminated comment
    f'"{OURS}"; dmarc=pass header.from=bank.example',  # an id authres does not take quoted
    f"{OURS}; dmarc=passed header.from=bank.example",  # not a result we write
    f"{OURS}; x-dmarc=pass header.from=bank.example",  # not a method we write
    f"{OURS}; spf=pass",  # SPF without its identity
    f"{OURS}; spf=pass smtp.mailfrom=a; spf=fail smtp.mailfrom=a",  # MAIL FROM twice
    f"{OURS}; arc=pass; arc=fail",
    f"{OURS}; dmarc=pass header.from=b\u00e4nk.example",  # raw non-ASCII
    f"{OURS}; dmarc=pass\nX-Injected: 1",  # a line break that is not folding
    f"{OURS}; dmarc=pass header.from=bank.example header.from=evil.test",
    f"{OURS}; dmarc=pass header.from=%FF%FE",  # not UTF-8 once unescaped
    f"{OURS}; dmarc=pass header.from=" + "a" * 70000,  # beyond any header we write
])
def test_an_unreadable_header_of_ours_is_trusted_for_nothing(value: str) -> None:
    """Anything in a header bearing our authserv-id that does not read as the auth milter
    writes it: no verdict at all (policy conditions read every method as none), never the
    pass it claims, and no domain to trust."""
    found = read(header(value), OURS)
    assert found is not None and found.unreadable and found.methods == {}
    assert verdicts(header(value), OURS) == {}
    assert dmarc_domain(header(value), OURS) is None
    assert trusted_results(header(value), OURS) == []


def test_a_good_header_beside_an_unreadable_one_is_not_trusted_either() -> None:
    headers = [(HEADER, f"{OURS}; dmarc=pass header.from=bank.example"),
               (HEADER, f"{OURS}; dmarc=pass (")]
    assert verdicts(headers, OURS) == {}


def test_headers_of_other_admds_are_not_read() -> None:
    headers = [(HEADER, "other.example; dmarc=pass header.from=bank.example"),
               (HEADER, f"{OURS}.evil; dmarc=pass")]
    assert verdicts(headers, OURS) is None


@pytest.mark.parametrize("value", [
    f"{OURS}(c)1; dmarc=pass",  # a comment glued to the id, then a version
    f"(x){OURS}; dmarc=pass",
    f"{OURS.upper()}.; dmarc=pass",
    f'"{OURS}"; dmarc=pass',
    f"\\{OURS}; dmarc=pass",
])
def test_every_spelling_of_our_id_is_deleted_as_forged(value: str) -> None:
    """RFC 8601 5: whatever any reader might take for our id is removed on the way in."""
    assert forged_indexes([(HEADER, value)], OURS) == [1]


def test_authserv_id_of_is_linear_on_a_megabyte_of_parentheses() -> None:
    """The lenient reading walks the text once (the regex loop before it went quadratic):
    bounded here by a generous count of work, not by time."""
    value = "(" * 500_000 + ")" * 500_000 + f" {OURS}; dmarc=pass"
    started = time.process_time()
    assert authserv_id_of(value) == OURS
    assert time.process_time() - started < 20  # generous: one pass takes well under 1 s


# --- SPF: MAIL FROM and HELO apart -----------------------------------------------------------
def test_passing_helo_never_hides_failing_mail_from() -> None:
    """RFC 7489 4.1 / RFC 7208 2.3-2.4: `spf` is the MAIL FROM result; the old reader took
    the best SPF result of the header, so spf=pass smtp.helo hid spf=fail smtp.mailfrom."""
    value = f"{OURS}; spf=pass smtp.helo=mail.evil.test; spf=fail smtp.mailfrom=bank.example"
    assert verdicts(header(value), OURS) == {"spf": "fail", "spf_helo": "pass"}
    assert trusted_results(header(value), OURS) == [("spf_helo", "pass"), ("spf", "fail")]


def test_null_sender_spf_is_the_helo_check() -> None:
    """RFC 7208 2.4: with MAIL FROM <>, the HELO identity is the MAIL FROM identity."""
    value = f"{OURS}; spf=softfail smtp.helo=mail.example.org"
    assert verdicts(header(value), OURS) == {"spf": "softfail", "spf_helo": "softfail"}


def test_spf_condition_matches_mail_from_even_when_helo_passes() -> None:
    policy = load_policy_text("""\
neutralize: {}
rules:
  - name: spf-fail
    when: {auth: {spf: [fail]}}
    then: {neutralize: neutralize}
  - name: helo-fail
    when: {auth: {spf_helo: [fail]}}
    then: {neutralize: neutralize}
defaults:
  neutralize: pass
""", EXTENSIONS)
    value = (f"{OURS}; spf=fail smtp.mailfrom=bank.example;\r\n\tspf=pass smtp.helo=a.test;"
             " dmarc=fail header.from=bank.example")
    raw = f"{HEADER}: {value}\r\nSubject: hi\r\n\r\nbody\r\n".encode()
    env = Envelope(client_ip="198.51.100.1", mail_from="a@bank.example")
    assert decide(policy, Message(raw=raw, envelope=env), OURS).why == "spf-fail"
    swapped = raw.replace(b"spf=fail smtp.m", b"spf=pass smtp.m").replace(
        b"spf=pass smtp.h", b"spf=fail smtp.h")
    assert decide(policy, Message(raw=swapped, envelope=env), OURS).why == "helo-fail"


# --- comments are for humans -----------------------------------------------------------------
def test_comment_unwraps_python_byte_reprs() -> None:
    assert comment("could not parse key (b'AAAA'): bad") == " (could not parse key \\(AAAA\\): bad)"


def test_comment_is_cut_at_a_word_boundary() -> None:
    words = " ".join(f"word{i}" for i in range(100))
    text = comment(words)[2:-1]
    assert text.endswith("...") and len(text) <= 160
    assert words.startswith(text[:-3]) and words[len(text) - 3] == " "


def test_comment_keeps_one_line_of_ascii() -> None:
    assert comment("a\r\nb\tc\x00d\u00e9e  f") == " (a b c d?e f)"
    assert comment("  \r\n ") == ""


@given(st.text(max_size=400))
def test_any_comment_parses_and_never_adds_a_result(text: str) -> None:
    value = f"{OURS}; dkim=fail{comment(text)} header.d=example.org"
    assert verdicts(header(value), OURS) == {"dkim": "fail"}


def test_header_comments_carry_no_repr_and_no_cut_word() -> None:
    reason = "key unusable: could not parse RSA public key (b'') " + "detail " * 40
    results = AuthResults(SpfResult("pass", "mailfrom", "example.org"), None,
                          [DkimResult("permerror", "example.org", "s", "rsa-sha256", "AAAA",
                                      reason=reason)], None, None)
    value = compose(OURS, results)
    assert "b'" not in value
    dkim_comment = re.search(r"dkim=permerror \((.*?)\) header", value.replace("\n\t  ", " "))
    assert dkim_comment and dkim_comment.group(1).endswith("detail...")


def test_reason_words_are_ascii_tokens() -> None:
    assert set(comment(string.printable)[2:-1]) <= set(string.printable)
