"""The auth milter's decision on whole messages: SPF, DKIM, ARC and DMARC through a
resolver that answers from a dict of dnspython rdata, and what the policy makes of them
(reject, quarantine, tag, tempfail, skip), the header it writes and the forged ones it
removes.
"""
from __future__ import annotations

import base64
import subprocess
import textwrap
import time

import dkim
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from milters.auth.checker import AuthChecker
from milters.auth.extension import EXTENSION as AUTH
from milters.core.dns import DnsSettings, DnsTempError, Resolver
from milters.core.edits import AddHeader, ChangeHeader, EomResult, Quarantine
from milters.core.errors import ConfigError
from milters.core.message import Envelope, Message
from milters.core.policy.document import Policy, load_policy_text
from milters.core.verdict import Action
from milters.ratelimit.extension import EXTENSION as RATELIMIT

HOSTNAME = "mx.gateway.test"
CLIENT = "192.0.2.10"
HELO = "mail.sender.test"
AR = "Authentication-Results"


def txt(text: str) -> dns.rdata.Rdata:
    """A TXT record; long texts split into 255-byte character-strings as in a zone."""
    chunks = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT,
                               " ".join(f'"{chunk}"' for chunk in chunks))


def a(address: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A, address)


class DictResolver(Resolver):
    """Answers from a dict (name, type) -> rdata list or an exception; records each ask."""

    def __init__(self, records: dict[tuple[str, str], object]) -> None:
        # A nameserver is named only so no system resolver config is read; never asked.
        super().__init__(DnsSettings(nameservers=(("127.0.0.1", 53),)))
        self.records = {(n.lower().rstrip("."), t): v for (n, t), v in records.items()}
        self.asked: list[tuple[str, str]] = []

    def lookup(self, name: str, rdtype: str) -> list:  # type: ignore[type-arg]
        key = (name.lower().rstrip("."), rdtype)
        self.asked.append(key)
        value = self.records.get(key, [])
        if isinstance(value, Exception):
            raise value
        return list(value)  # type: ignore[call-overload]


SPF_OK = "v=spf1 ip4:192.0.2.0/24 -all"
ZONE: dict[tuple[str, str], object] = {
    # attacker.test: SPF passes for our client, but it is never the From domain.
    ("attacker.test", "TXT"): [txt(SPF_OK)],
    ("good.test", "TXT"): [txt(SPF_OK)],
    ("_dmarc.good.test", "TXT"): [txt("v=DMARC1; p=reject")],
    ("_dmarc.reject.test", "TXT"): [txt("v=DMARC1; p=reject")],
    ("_dmarc.quarantine.test", "TXT"): [txt("v=DMARC1; p=quarantine")],
    ("_dmarc.none.test", "TXT"): [txt("v=DMARC1; p=none")],
    ("_dmarc.example.org", "TXT"): [txt("v=DMARC1; p=none")],
    ("_dmarc.slow.test", "TXT"): DnsTempError("DNS timeout looking up _dmarc.slow.test TXT"),
    (HELO, "TXT"): [txt(SPF_OK)],
    (HELO, "A"): [a(CLIENT)],
}


def policy(text: str = "", source: str = "auth.yaml") -> Policy:
    return load_policy_text(textwrap.dedent(text), [RATELIMIT, AUTH], source)


def message(from_line: str | None, mail_from: str = "bounce@attacker.test",
            client_ip: str = CLIENT, auth_user: str | None = None,
            extra: bytes = b"", body: bytes = b"Hello.\r\n") -> Message:
    head = extra
    if from_line is not None:
        head += f"From: {from_line}\r\n".encode()
    head += (b"To: bob@recipient.test\r\n"
             b"Subject: Invoice\r\n"
             b"Date: Sun, 29 Nov 2026 01:00:00 +0000\r\n"
             b"Message-ID: <m1@sender.test>\r\n")
    return Message(raw=head + b"\r\n" + body,
                   envelope=Envelope(client_ip=client_ip, helo=HELO, mail_from=mail_from,
                                     auth_user=auth_user, queue_id="4XyZ1"))


def check(msg: Message, pol: Policy | None = None,
          zone: dict[tuple[str, str], object] | None = None) -> EomResult:
    checker = AuthChecker(HOSTNAME, DictResolver(ZONE if zone is None else zone),
                          sample=lambda: 0.0)
    return checker.check(msg, pol or policy())


def added_headers(result: EomResult) -> list[AddHeader]:
    return [e for e in result.edits if isinstance(e, AddHeader)]


def our_header(result: EomResult) -> str:
    headers = [e for e in added_headers(result) if e.name == AR]
    assert len(headers) == 1, result.edits
    return headers[0].value


# --- DMARC dispositions ----------------------------------------------------------------------


def test_p_reject_failure_is_rejected_with_550_571() -> None:
    """RFC 7489 6.6.4/7.3 (p=reject: reject during the SMTP transaction, 550 5.7.1)."""
    result = check(message("CEO <ceo@reject.test>"))
    assert result.verdict.action is Action.REJECT
    assert result.verdict.reply is not None
    assert (result.verdict.reply.code, result.verdict.reply.enhanced) == (550, "5.7.1")
    assert "dmarc=fail" in our_header(result)


def test_p_quarantine_failure_continues_with_quarantine() -> None:
    """RFC 7489 6.6.4: p=quarantine: accept but hold the message (milter quarantine)."""
    result = check(message("Billing <billing@quarantine.test>"))
    assert result.verdict.action is Action.CONTINUE
    quarantines = [e for e in result.edits if isinstance(e, Quarantine)]
    assert len(quarantines) == 1 and "quarantine.test" in quarantines[0].reason
    assert "dmarc=fail" in our_header(result)


def test_p_none_failure_only_adds_the_header() -> None:
    """RFC 7489 6.3 p=none: the owner asks for no action: the header is the only change."""
    result = check(message("news@none.test"))
    assert result.verdict.action is Action.CONTINUE
    assert len(result.edits) == 1 and isinstance(result.edits[0], AddHeader)
    assert "dmarc=fail" in result.edits[0].value


def test_aligned_pass_continues_without_quarantine() -> None:
    """RFC 7489 4.2: an aligned SPF pass under p=reject is delivered untouched."""
    result = check(message("Alice <alice@good.test>", mail_from="alice@good.test"))
    assert result.verdict.action is Action.CONTINUE
    assert not any(isinstance(e, Quarantine) for e in result.edits)
    header = our_header(result)
    assert "dmarc=pass" in header and "spf=pass" in header
    assert "smtp.mailfrom=good.test" in header and "header.from=good.test" in header


def test_header_is_added_on_top_with_our_authserv_id() -> None:
    """RFC 8601 5: our header goes above all others (insheader index 0) and starts with
    our authserv-id, the gateway's hostname (the id later milters trust)."""
    result = check(message("news@none.test"))
    header = added_headers(result)[0]
    assert (header.name, header.index) == (AR, 0)
    assert header.value.startswith(HOSTNAME + ";")


# --- forged headers --------------------------------------------------------------------------

FORGED = (f"{AR}: other.example; spf=pass smtp.mailfrom=other.example\r\n"
          f"{AR}: {HOSTNAME}; dmarc=pass header.from=reject.test\r\n").encode()


def test_forged_header_with_our_id_is_deleted_others_stay() -> None:
    """RFC 8601 5: an incoming header with our authserv-id is deleted (chgheader with an
    empty value, 1-based among Authentication-Results); another ADMD's header stays."""
    result = check(message("news@none.test", extra=FORGED))
    changes = [e for e in result.edits if isinstance(e, ChangeHeader)]
    assert changes == [ChangeHeader(AR, 2, "")]
    assert result.verdict.action is Action.CONTINUE


def test_forged_pass_does_not_save_a_failing_message() -> None:
    """RFC 8601 5: a forged dmarc=pass is ignored; our own check rejects."""
    result = check(message("CEO <ceo@reject.test>", extra=FORGED))
    assert result.verdict.action is Action.REJECT
    assert ChangeHeader(AR, 2, "") in result.edits


def test_every_forged_header_is_deleted_highest_first() -> None:
    """RFC 8601 5: several forgeries are all removed, from the bottom up so that each
    deletion leaves the remaining indexes valid."""
    extra = (f"{AR}: {HOSTNAME}; dkim=pass header.d=reject.test\r\n".encode() + FORGED)
    result = check(message("news@none.test", extra=extra))
    changes = [e for e in result.edits if isinstance(e, ChangeHeader)]
    assert changes == [ChangeHeader(AR, 3, ""), ChangeHeader(AR, 1, "")]


# --- who is checked --------------------------------------------------------------------------


def test_internal_client_is_skipped_but_forgeries_removed() -> None:
    """Local policy (RFC 7489 7.2 is the receiver's own): internal networks (127.0.0.1 by
    default) get no checks and no header, yet a forged header is still deleted."""
    resolver = DictResolver(ZONE)
    checker = AuthChecker(HOSTNAME, resolver)
    msg = message("CEO <ceo@reject.test>", client_ip="127.0.0.1", extra=FORGED)
    result = checker.check(msg, policy())
    assert result.verdict.action is Action.CONTINUE
    assert added_headers(result) == []
    assert result.edits == [ChangeHeader(AR, 2, "")]
    assert resolver.asked == []  # no SPF, DKIM or DMARC lookups at all


def test_authenticated_client_is_skipped_but_forgeries_removed() -> None:
    """Local policy: an SMTP-authenticated user's outgoing mail is not DMARC-checked."""
    resolver = DictResolver(ZONE)
    checker = AuthChecker(HOSTNAME, resolver)
    msg = message("CEO <ceo@reject.test>", auth_user="alice", extra=FORGED)
    result = checker.check(msg, policy())
    assert result.verdict.action is Action.CONTINUE
    assert added_headers(result) == []
    assert result.edits == [ChangeHeader(AR, 2, "")]
    assert resolver.asked == []


def test_internal_enforce_checks_internal_clients() -> None:
    """Local policy: `internal: enforce` checks internal clients like any other."""
    msg = message("CEO <ceo@reject.test>", client_ip="127.0.0.1")
    result = check(msg, policy("auth: {internal: enforce}\n"))
    assert result.verdict.action is Action.REJECT


def test_rule_tag_turns_reject_into_tag() -> None:
    """Local policy (RFC 7489 7.2): a rule with `then: {auth: tag}` still checks and writes
    the header but does not act on the failure."""
    pol = policy("""\
        rules:
          - name: partner-relay
            when: {client_ip: [192.0.2.0/24]}
            then: {auth: tag}
        """)
    result = check(message("CEO <ceo@reject.test>"), pol)
    assert result.verdict.action is Action.CONTINUE
    assert not any(isinstance(e, Quarantine) for e in result.edits)
    assert "dmarc=fail" in our_header(result)


def test_domain_override_quarantines_p_none_failure() -> None:
    """Local policy (RFC 7489 7.2): per-domain actions override what the domain asks; a
    p=none failure for example.org (and its subdomains) is quarantined."""
    pol = policy("""\
        auth:
          dmarc:
            domains:
              example.org: {none: quarantine}
        """)
    result = check(message("Payroll <payroll@example.org>"), pol)
    assert result.verdict.action is Action.CONTINUE
    assert any(isinstance(e, Quarantine) for e in result.edits)
    # Without the override the same failure is only tagged.
    plain = check(message("Payroll <payroll@example.org>"))
    assert not any(isinstance(e, Quarantine) for e in plain.edits)


# --- temporary errors ------------------------------------------------------------------------


def test_dmarc_dns_temp_error_tempfails_451_443() -> None:
    """RFC 7489 6.6.3 / RFC 8601 2.7.1 temperror: ask the sender to retry (451 4.4.3)."""
    result = check(message("alerts@slow.test"))
    assert result.verdict.action is Action.TEMPFAIL
    assert result.verdict.reply is not None
    assert (result.verdict.reply.code, result.verdict.reply.enhanced) == (451, "4.4.3")


def test_on_temperror_tag_continues() -> None:
    """Local policy: `on_temperror: tag` delivers with dmarc=temperror in the header."""
    result = check(message("alerts@slow.test"), policy("auth: {on_temperror: tag}\n"))
    assert result.verdict.action is Action.CONTINUE
    assert "dmarc=temperror" in our_header(result)


# --- ARC -------------------------------------------------------------------------------------

SEALER = "fwd.example.com"


@pytest.fixture(scope="module")
def sealer_key() -> tuple[bytes, str]:
    """An RSA key for the forwarder: PEM private key and the p= of its key record."""
    pem = subprocess.run(["openssl", "genrsa", "2048"], capture_output=True, check=True,
                         timeout=60).stdout
    der = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=pem,
                         capture_output=True, check=True, timeout=60).stdout
    return pem, base64.b64encode(der).decode()


def forwarded(sealer_key: tuple[bytes, str]) -> tuple[Message, dict[tuple[str, str], object]]:
    """A p=reject domain's message as a mailing list at fwd.example.com relays it: checked
    there (its own Authentication-Results), sealed (ARC i=1), sent on from its own IP."""
    pem, public = sealer_key
    original = message("CEO <ceo@reject.test>", mail_from="list-bounce@attacker.test",
                       extra=f"{AR}: {SEALER}; spf=pass smtp.mailfrom=reject.test;\r\n"
                             f"\tdmarc=pass header.from=reject.test\r\n".encode())
    seal = dkim.arc_sign(original.raw, b"arc", SEALER.encode(), pem, SEALER.encode(),
                         timestamp=int(time.time()))
    assert len(seal) == 3, "dkimpy found no Authentication-Results of the sealer"
    msg = Message(raw=b"".join(seal) + original.raw, envelope=original.envelope)
    zone = dict(ZONE)
    zone[(f"arc._domainkey.{SEALER}", "TXT")] = [txt(f"v=DKIM1; k=rsa; p={public}")]
    return msg, zone


def test_trusted_arc_sealer_overrides_dmarc_fail(sealer_key: tuple[bytes, str]) -> None:
    """RFC 7489 7.2 local policy with RFC 8617 7.2: a valid ARC chain sealed by a forwarder
    the policy trusts vouches for the original authentication: deliver, with arc=pass."""
    msg, zone = forwarded(sealer_key)
    pol = policy(f"auth: {{arc_trusted_sealers: [{SEALER}]}}\n")
    result = check(msg, pol, zone)
    assert result.verdict.action is Action.CONTINUE
    assert not any(isinstance(e, Quarantine) for e in result.edits)
    header = our_header(result)
    assert "arc=pass" in header and SEALER in header and "dmarc=fail" in header


def test_untrusted_arc_sealer_does_not_override(sealer_key: tuple[bytes, str]) -> None:
    """RFC 8617 7.2: an ARC pass only matters for sealers the receiver trusts."""
    msg, zone = forwarded(sealer_key)
    result = check(msg, policy(), zone)
    assert result.verdict.action is Action.REJECT


def test_trusted_sealer_with_broken_chain_does_not_override(
        sealer_key: tuple[bytes, str]) -> None:
    """RFC 8617 5.2: a chain broken after sealing (body changed) is arc=fail: no override."""
    msg, zone = forwarded(sealer_key)
    tampered = Message(raw=msg.raw.replace(b"Hello.", b"Pay now."), envelope=msg.envelope)
    pol = policy(f"auth: {{arc_trusted_sealers: [{SEALER}]}}\n")
    result = check(tampered, pol, zone)
    assert result.verdict.action is Action.REJECT


# --- bad From --------------------------------------------------------------------------------


def test_no_from_is_tagged_by_default() -> None:
    """RFC 7489 6.6.1 (no usable From: DMARC permerror); by default only tagged."""
    result = check(message(None))
    assert result.verdict.action is Action.CONTINUE
    assert "dmarc=permerror" in our_header(result)


def test_no_from_rejected_with_on_bad_from_reject() -> None:
    """RFC 7489 6.6.1: a receiver may reject mail without a single From (RFC 5322 3.6)."""
    result = check(message(None), policy("auth: {on_bad_from: reject}\n"))
    assert result.verdict.action is Action.REJECT
    assert result.verdict.reply is not None
    assert (result.verdict.reply.code, result.verdict.reply.enhanced) == (550, "5.7.1")


def test_two_from_headers_rejected_with_on_bad_from_reject() -> None:
    """RFC 7489 6.6.1: two From fields, one a p=none domain and one a p=reject domain,
    cannot pick the lenient one; with on_bad_from: reject they are refused."""
    msg = message("news@none.test", extra=b"From: CEO <ceo@reject.test>\r\n")
    result = check(msg, policy("auth: {on_bad_from: reject}\n"))
    assert result.verdict.action is Action.REJECT


@pytest.mark.parametrize("where", ["from", "subject", "forged-ar"])
def test_one_megabyte_header_gets_a_defined_verdict(where: str) -> None:
    """RFC 5322 2.1.1 allows no such line, but one arrives anyway: the checker must still
    decide (no exception that would tempfail every retry) and still write its header."""
    huge = "x" * (1024 * 1024)
    if where == "from":
        msg = message(f"{huge} <ceo@reject.test>")
    elif where == "subject":
        msg = message("CEO <ceo@reject.test>", extra=f"X-Big: {huge}\r\n".encode())
    else:
        msg = message("CEO <ceo@reject.test>",
                      extra=f"{AR}: ({huge}) {HOSTNAME}; dmarc=pass\r\n".encode())
    started = time.monotonic()
    result = check(msg)
    assert time.monotonic() - started < 10
    assert result.verdict.action in (Action.REJECT, Action.CONTINUE)
    assert our_header(result).startswith(HOSTNAME)
    if where != "from":  # the From itself is fine here: the p=reject failure stands
        assert result.verdict.action is Action.REJECT
    if where == "forged-ar":
        assert ChangeHeader(AR, 1, "") in result.edits


# --- policy validation -----------------------------------------------------------------------


def test_typo_under_auth_is_reported_with_file_and_line() -> None:
    """A mistyped key must not silently fall back to defaults: FILE:LINE:COL and a hint."""
    with pytest.raises(ConfigError) as caught:
        policy("""\
            auth:
              dmarc:
                actons: {none: quarantine}
            """, source="auth.yaml")
    assert caught.value.problems == [
        "auth.yaml:3:5: auth.dmarc.actons: unknown key; did you mean 'actions'? (got actons)"]


def test_bad_outcome_in_domain_override_is_reported_with_line() -> None:
    """A wrong action word inside a per-domain override is as visible as at the top."""
    with pytest.raises(ConfigError) as caught:
        policy("""\
            auth:
              dmarc:
                domains:
                  example.org: {none: quarantne}
            """, source="auth.yaml")
    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert problem.startswith("auth.yaml:4:") and "quarantne" in problem


# --- several authors (RFC 7489 6.6.1, issue 13) ----------------------------------------------
def test_forged_from_prepended_over_another_domain_is_judged_by_its_own_policy() -> None:
    """A From of a p=reject domain prepended over mail of a domain that passes (or has no
    DMARC): each author domain is evaluated and the strictest policy applies, so the
    message is rejected by default (it used to be a permerror, only tagged)."""
    msg = message("Alice <a@attacker.test>", extra=b"From: CEO <ceo@reject.test>\r\n")
    result = check(msg)
    assert result.verdict.action is Action.REJECT
    value = our_header(result)
    from milters.core.auth_results import parse
    _, infos = parse(value)
    assert [(i.method, i.result, i.values("header.from")) for i in infos
            if i.method == "dmarc"] == [("dmarc", "fail", ["reject.test"]),
                                        ("dmarc", "none", ["attacker.test"])]
    assert "from=reject.test" in (result.verdict.reason or "")


def test_two_addresses_in_one_from_take_the_strictest_policy() -> None:
    result = check(message("a@none.test, b@quarantine.test"))
    assert result.verdict.action is Action.CONTINUE
    assert [e for e in result.edits if isinstance(e, Quarantine)]
    assert "header.from=quarantine.test" in our_header(result)


def test_several_passing_authors_pass() -> None:
    zone = dict(ZONE)
    zone[("_dmarc.attacker.test", "TXT")] = [txt("v=DMARC1; p=reject")]
    result = check(message("a@attacker.test", mail_from="x@attacker.test",
                           extra=b"From: b@attacker.test\r\n"), zone=zone)
    assert result.verdict.action is Action.CONTINUE
    assert our_header(result).count("dmarc=pass") == 1  # one domain, evaluated once


def test_an_author_without_domain_beside_a_passing_one_is_a_bad_from() -> None:
    msg = message("a@attacker.test, nobody")
    assert check(msg).verdict.action is Action.CONTINUE  # on_bad_from: tag (the default)
    result = check(msg, policy("auth: {on_bad_from: reject}\n"))
    assert result.verdict.action is Action.REJECT
    assert "dmarc=permerror" in our_header(result)
