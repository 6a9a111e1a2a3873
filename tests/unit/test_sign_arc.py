"""ARC sealing (RFC 8617) checked by verifiers that are not the sealer: dkimpy's ARC
verifier (dkim.arc_verify) and the auth milter's own (milters.auth.dkim_check.verify_arc,
what a second pass through our gateway would say). Incoming chains come from dkimpy's ARC
signer, as a forwarder's would; the Authentication-Results we seal is written by the auth
milter's own writer (results_header.compose), as in the running chain."""
from __future__ import annotations

import base64
import logging
import re
from typing import Callable

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from milters.auth.dkim_check import ArcResult, DkimResult, verify_arc
from milters.auth.dmarc import DmarcResult
from milters.auth.results_header import AuthResults, compose
from milters.auth.spf import SpfResult
from milters.sign import arc_seal
from milters.sign.arc_seal import NotSealed, Sealed, seal
from milters.sign.dkim_sign import SigningKey, canonical_body_hash

AUTHSERV_ID = "mx.example.jp"
OUR_DOMAIN = "example.jp"
FORWARDER = "lists.example.net"
T = 1_700_000_000  # t=: any fixed time; nothing here reads the clock

BODY = (b"Hello Taro,\r\n\r\nthe  figures   are attached.\r\n"
        b"hxxps://example[.]com/report\r\n\r\n\r\n")
HEAD = (b"Received: from mail.example.org by mx.example.jp; Sun, 29 Nov 2026 10:00:00 +0900\r\n"
        b"From: Alice <alice@example.org>\r\n"
        b"To: Taro <taro@example.jp>\r\n"
        b"Subject: Quarterly report\r\n"
        b"Date: Sun, 29 Nov 2026 10:00:00 +0900\r\n"
        b"Message-ID: <q4@example.org>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n")


# -- keys and their DNS ------------------------------------------------------------------------
def _rsa_record(private: rsa.RSAPrivateKey) -> bytes:
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def _ed_record(private: ed25519.Ed25519PrivateKey) -> bytes:
    raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


@pytest.fixture(scope="module")
def world() -> dict[str, object]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    forwarder = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    zone = {f"arc._domainkey.{OUR_DOMAIN}": _rsa_record(rsa_key),
            f"arced._domainkey.{OUR_DOMAIN}": _ed_record(ed_key),
            f"fwd._domainkey.{FORWARDER}": _rsa_record(forwarder)}
    return {
        "rsa": SigningKey(OUR_DOMAIN, "arc", "rsa-sha256", rsa_key),
        "ed": SigningKey(OUR_DOMAIN, "arced", "ed25519-sha256", ed_key),
        "forwarder_pem": forwarder.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                                 serialization.NoEncryption()),
        "zone": zone,
    }


def dnsfunc(zone: dict[str, bytes]) -> Callable[..., bytes | None]:
    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        return zone.get(text.rstrip(".").lower())
    return lookup


def txt_lookup(zone: dict[str, bytes]) -> Callable[[str], list[bytes]]:
    return lambda name: [zone[name]] if name in zone else []


# -- messages ---------------------------------------------------------------------------------
def fields_of(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(name, value after the colon) top to bottom, and the body."""
    head, _, body = message.partition(b"\r\n\r\n")
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields, body


def auth_header(arc: ArcResult | None) -> bytes:
    """Our Authentication-Results as the auth milter writes it (bare LF folding)."""
    results = AuthResults(
        SpfResult("fail", "mailfrom", "example.org", "198.51.100.7 is not allowed"), None,
        [DkimResult("pass", "example.org", "s1", "rsa-sha256", "AbCdEfGh")], arc,
        DmarcResult("pass", "example.org", "reject", "none"))
    value = compose(AUTHSERV_ID, results).replace("\n", "\r\n")
    return b"Authentication-Results: " + value.encode() + b"\r\n"


def with_auth(message: bytes, arc: ArcResult | None = ArcResult("none")) -> bytes:
    return auth_header(arc) + message


def sealed_by_us(message: bytes, key: SigningKey) -> tuple[bytes, Sealed]:
    fields, body = fields_of(message)
    result = seal(fields, canonical_body_hash([body], "relaxed"), key=key,
                  authserv_id=AUTHSERV_ID, timestamp=T)
    assert isinstance(result, Sealed), result
    added = b"".join(name + b":" + value + b"\r\n" for name, value in result.fields)
    return added + message, result


def forwarded(world: dict[str, object], message: bytes, *, srv_id: str = "mx.lists.example.net",
              arc: str = "none") -> bytes:
    """A forwarder's ARC set (dkimpy's signer) over `message`, its own A-R left on."""
    ar = f"Authentication-Results: {srv_id}; spf=pass smtp.mailfrom=example.org"
    if arc != "none":
        ar += f"; arc={arc}"
    checked = (ar + "\r\n").encode() + message
    headers = dkim.arc_sign(checked, b"fwd", FORWARDER.encode(), world["forwarder_pem"],
                            srv_id.encode(), timestamp=T - 60)
    assert len(headers) == 3
    return b"".join(headers) + checked


def dkimpy_cv(message: bytes, world: dict[str, object]) -> bytes | None:
    cv, _, _ = dkim.arc_verify(message, dnsfunc=dnsfunc(world["zone"]))  # type: ignore
    return cv


def ours_cv(message: bytes, world: dict[str, object]) -> str:
    return verify_arc(message, txt_lookup(world["zone"])).result  # type: ignore[arg-type]


def tag(value: bytes, name: str) -> str:
    tags = dkim.util.parse_tag_value(value)
    return tags[name.encode()].decode()


MESSAGE = HEAD + b"\r\n" + BODY
QUIET = logging.getLogger("test.sign.arc.dkimpy")  # dkimpy logs every refusal at ERROR
QUIET.addHandler(logging.NullHandler())
QUIET.propagate = False


# -- the first hop ----------------------------------------------------------------------------
def test_a_first_seal_is_cv_none_and_verifies_with_dkimpy_and_our_auth_milter(
        world: dict[str, object]) -> None:
    message, result = sealed_by_us(with_auth(MESSAGE), world["rsa"])  # type: ignore[arg-type]
    seal_value = result.fields[0][1]
    assert tag(seal_value, "i") == "1" and tag(seal_value, "cv") == "none"
    assert tag(seal_value, "a") == "rsa-sha256"
    assert dkimpy_cv(message, world) == b"pass"
    assert ours_cv(message, world) == "pass"


def test_an_ed25519_key_is_refused_for_arc_as_verifiers_refuse_it(
        world: dict[str, object]) -> None:
    # dkimpy's ARC verifier, and with it our auth milter, knows rsa-sha256 only: an
    # ed25519 set would reach the next hop as cv=fail.
    with pytest.raises(ValueError, match="rsa-sha256 only"):
        seal(*_fields_and_hash(with_auth(MESSAGE)), key=world["ed"],  # type: ignore[arg-type]
             authserv_id=AUTHSERV_ID, timestamp=T)


def test_the_set_is_inserted_seal_first_and_every_line_is_short(world: dict[str, object]) -> None:
    _, result = sealed_by_us(with_auth(MESSAGE), world["rsa"])  # type: ignore[arg-type]
    assert [name for name, _ in result.fields] == [
        b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results"]
    for name, value in result.fields:
        for line in (name + b":" + value).split(b"\r\n"):
            assert len(line) <= 78, line
        assert not re.search(rb"(?<!\r)\n|\r(?!\n)", value)


def test_the_aar_carries_our_verdicts_exactly(world: dict[str, object]) -> None:
    message = with_auth(MESSAGE)
    sealed, result = sealed_by_us(message, world["rsa"])  # type: ignore[arg-type]
    aar = result.fields[2][1]
    ours = fields_of(message)[0][0][1]
    assert aar == b" i=1; " + ours.lstrip()
    # dkimpy (the next hop) reads the set's results back with its RFC 8601 parser
    cv, results, _ = dkim.arc_verify(sealed, dnsfunc=dnsfunc(world["zone"]))  # type: ignore
    assert cv == b"pass" and b"dmarc=pass" in results[0]["aar-value"]
    assert b"i=1; mx.example.jp;" in results[0]["aar-value"]


def test_the_ams_never_signs_arc_seal_or_authentication_results_and_oversigns_from(
        world: dict[str, object]) -> None:
    _, result = sealed_by_us(with_auth(MESSAGE), world["rsa"])  # type: ignore[arg-type]
    h = [n.strip() for n in tag(result.fields[1][1], "h").split(":")]
    assert "arc-seal" not in h and "authentication-results" not in h
    assert h.count("from") == 2 and h.count("subject") == 2
    assert tag(result.fields[1][1], "c") == "relaxed/relaxed"
    assert "l" not in dkim.util.parse_tag_value(result.fields[1][1])


# -- altered after sealing --------------------------------------------------------------------
ALTERATIONS = {
    "body": lambda m: m.replace(b"figures", b"figure5"),
    "subject": lambda m: m.replace(b"Subject: Quarterly report", b"Subject: Urgent: pay now"),
    "a second From": lambda m: m.replace(b"To: Taro", b"From: ceo@example.jp\r\nTo: Taro"),
    "the aar": lambda m: m.replace(b"dmarc=pass", b"dmarc=fail", 1),
    "the seal's cv": lambda m: m.replace(b"cv=none", b"cv=pass", 1),
}


@pytest.mark.parametrize("how", list(ALTERATIONS))
def test_a_message_altered_after_sealing_fails(world: dict[str, object], how: str) -> None:
    message, _ = sealed_by_us(with_auth(MESSAGE), world["rsa"])  # type: ignore[arg-type]
    altered = ALTERATIONS[how](message)
    assert altered != message
    assert dkimpy_cv(altered, world) != b"pass"
    assert ours_cv(altered, world) == "fail"


# -- an incoming chain --------------------------------------------------------------------------
def test_a_valid_incoming_chain_is_continued_with_cv_pass(world: dict[str, object]) -> None:
    incoming = forwarded(world, MESSAGE)
    verdict = verify_arc(incoming, txt_lookup(world["zone"]))  # type: ignore[arg-type]
    assert verdict.result == "pass"  # what the auth milter writes as arc=
    # our edit (neutralize rewrote a link) breaks the forwarder's AMS, not our seal
    changed = with_auth(incoming, verdict).replace(b"hxxps://example[.]com", b"[link removed]")
    message, result = sealed_by_us(changed, world["rsa"])  # type: ignore[arg-type]
    assert tag(result.fields[0][1], "i") == "2" and tag(result.fields[0][1], "cv") == "pass"
    cv, results, reason = dkim.arc_verify(message, dnsfunc=dnsfunc(world["zone"]))  # type: ignore
    assert cv == b"pass", reason
    assert [r["as-domain"] for r in results] == [OUR_DOMAIN.encode(), FORWARDER.encode()]
    assert ours_cv(message, world) == "pass"


def test_a_third_hop_continues_our_seal(world: dict[str, object]) -> None:
    message, _ = sealed_by_us(with_auth(MESSAGE), world["rsa"])  # type: ignore[arg-type]
    # the next hop (dkimpy) seals on top of ours: our set stays valid inside its chain
    third = forwarded(world, message, arc="pass")
    cv, results, reason = dkim.arc_verify(third, dnsfunc=dnsfunc(world["zone"]))  # type: ignore
    assert cv == b"pass" and len(results) == 2, reason


def test_a_broken_incoming_chain_is_sealed_cv_fail_over_our_set_only(
        world: dict[str, object]) -> None:
    incoming = forwarded(world, MESSAGE).replace(b"figures", b"FIGURES")  # broken in transit
    verdict = verify_arc(incoming, txt_lookup(world["zone"]))  # type: ignore[arg-type]
    assert verdict.result == "fail"
    message, result = sealed_by_us(with_auth(incoming, verdict), world["rsa"])  # type: ignore
    assert tag(result.fields[0][1], "i") == "2" and tag(result.fields[0][1], "cv") == "fail"
    assert dkimpy_cv(message, world) != b"pass"
    assert ours_cv(message, world) == "fail"
    # RFC 8617 5.1.2: the seal signs our set as if it were the only one; with the
    # forwarder's set taken away, dkimpy checks both of our signatures as valid.
    only_ours = b"".join(name + b":" + value + b"\r\n" for name, value in result.fields)
    rest = re.sub(rb"ARC-[A-Za-z-]+: i=1;.*?\r\n(?![ \t])", b"", incoming, flags=re.S)
    assert b"i=1" not in rest
    verifier = dkim.ARC(only_ours + rest)
    verifier.logger = QUIET
    _, sets = verifier.sorted_arc_headers()
    checked = verifier.verify_instance(sets, 2, dnsfunc=dnsfunc(world["zone"]))  # type: ignore
    assert checked["as-valid"] and checked["ams-valid"]


def test_a_chain_that_already_failed_is_not_continued(world: dict[str, object]) -> None:
    # a forwarder that found the chain broken sealed cv=fail: that chain has ended
    broken = forwarded(world, MESSAGE).replace(b"figures", b"FIGURES")
    ended = forwarded(world, broken, arc="fail")
    assert b"cv=fail" in ended
    result = seal(*_fields_and_hash(with_auth(ended, ArcResult("fail"))),
                  key=world["rsa"], authserv_id=AUTHSERV_ID, timestamp=T)  # type: ignore
    assert isinstance(result, NotSealed) and "cv=fail" in result.reason


def _fields_and_hash(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    fields, body = fields_of(message)
    return fields, canonical_body_hash([body], "relaxed")


# -- what the auth milter said against what the headers say ------------------------------------
def test_arc_pass_with_no_chain_left_is_sealed_cv_fail(world: dict[str, object]) -> None:
    result = arc_seal.plan(fields_of(with_auth(MESSAGE, ArcResult("pass", (FORWARDER,))))[0],
                           AUTHSERV_ID)
    assert not isinstance(result, NotSealed)
    assert (result.instance, result.chain_status) == (1, "fail") and "no ARC set" in result.note


def test_arc_none_with_arc_headers_present_is_sealed_cv_fail(world: dict[str, object]) -> None:
    incoming = forwarded(world, MESSAGE)
    result = arc_seal.plan(fields_of(with_auth(incoming, ArcResult("none")))[0], AUTHSERV_ID)
    assert not isinstance(result, NotSealed)
    assert (result.instance, result.chain_status, result.previous) == (2, "fail", ())


def test_arc_pass_with_a_duplicated_set_is_sealed_cv_fail(world: dict[str, object]) -> None:
    incoming = forwarded(world, MESSAGE)
    seal_line = re.search(rb"ARC-Seal:.*?\r\n(?![ \t])", incoming, re.S).group()  # type: ignore
    doubled = seal_line + incoming
    result = arc_seal.plan(fields_of(with_auth(doubled, ArcResult("pass", (FORWARDER,))))[0],
                           AUTHSERV_ID)
    assert not isinstance(result, NotSealed)
    assert result.chain_status == "fail" and "not one of each" in result.note


def fake_chain(count: int) -> bytes:
    lines = []
    for i in range(count, 0, -1):
        lines += [f"ARC-Seal: i={i}; a=rsa-sha256; cv={'none' if i == 1 else 'pass'}; "
                  f"d=x.test; s=s; b=AAAA",
                  f"ARC-Message-Signature: i={i}; a=rsa-sha256; d=x.test; s=s; h=from; "
                  f"bh=AAAA; b=AAAA",
                  f"ARC-Authentication-Results: i={i}; x.test; arc=pass"]
    return ("\r\n".join(lines) + "\r\n").encode()


def test_fifty_sets_get_no_fifty_first(world: dict[str, object]) -> None:
    message = with_auth(fake_chain(50) + MESSAGE, ArcResult("pass", ("x.test",)))
    result = seal(*_fields_and_hash(message), key=world["rsa"],  # type: ignore[arg-type]
                  authserv_id=AUTHSERV_ID, timestamp=T)
    assert isinstance(result, NotSealed) and "50" in result.reason


def test_forty_nine_sets_get_the_fiftieth(world: dict[str, object]) -> None:
    message = with_auth(fake_chain(49) + MESSAGE, ArcResult("fail", ("x.test",)))
    result = seal(*_fields_and_hash(message), key=world["rsa"],  # type: ignore[arg-type]
                  authserv_id=AUTHSERV_ID, timestamp=T)
    assert isinstance(result, Sealed)
    assert tag(result.fields[0][1], "i") == "50" and tag(result.fields[0][1], "cv") == "fail"


@pytest.mark.parametrize("header, outcome", [
    (b"ARC-Seal: i=999999999; a=rsa-sha256; cv=pass; d=x.test; s=s; b=AA\r\n", "not sealed"),
    (b"ARC-Seal: i=99999999999999999999; a=rsa-sha256; cv=none; d=x.test; s=s; b=AA\r\n",
     "i=1 cv=fail"),
    (b"ARC-Seal: i=-3; a=rsa-sha256; cv=none; d=x.test; s=s; b=AA\r\n", "i=1 cv=fail"),
    (b"ARC-Authentication-Results: x.test; i=1; arc=pass\r\n", "i=1 cv=fail"),
    (b"ARC-Message-Signature: i=1; i=2; a=rsa-sha256; b=AA\r\n", "i=1 cv=fail"),
])
def test_forged_instance_numbers_never_give_cv_pass(world: dict[str, object], header: bytes,
                                                    outcome: str) -> None:
    message = with_auth(header + MESSAGE, ArcResult("pass", ("x.test",)))
    result = seal(*_fields_and_hash(message), key=world["rsa"],  # type: ignore[arg-type]
                  authserv_id=AUTHSERV_ID, timestamp=T)
    if outcome == "not sealed":
        assert isinstance(result, NotSealed)
        return
    assert isinstance(result, Sealed)
    got = f"i={tag(result.fields[0][1], 'i')} cv={tag(result.fields[0][1], 'cv')}"
    assert got == outcome


# -- whose verdicts ---------------------------------------------------------------------------
def test_no_authentication_results_of_ours_means_no_seal(world: dict[str, object]) -> None:
    other = auth_header(ArcResult("none")).replace(AUTHSERV_ID.encode(), b"mx.attacker.test")
    result = seal(*_fields_and_hash(other + MESSAGE), key=world["rsa"],  # type: ignore
                  authserv_id=AUTHSERV_ID, timestamp=T)
    assert isinstance(result, NotSealed) and "auth did not run" in result.reason


def test_another_admds_results_are_not_what_we_seal(world: dict[str, object]) -> None:
    other = (b"Authentication-Results: mx.attacker.test; dmarc=pass header.from=example.org;"
             b" arc=pass\r\n")
    message, result = sealed_by_us(other + with_auth(MESSAGE), world["rsa"])  # type: ignore
    assert b"attacker" not in result.fields[2][1] and b"spf=fail" in result.fields[2][1]
    assert result.plan.chain_status == "none"


@pytest.mark.parametrize("value", [
    b"mx.example.jp; arc=maybe",  # a result the auth milter never writes
    b"mx.example.jp; spf=pass",  # an spf result naming no identity
    b"mx.example.jp; dkim=pass header.d=\xe4\xbe\x8b.test",  # raw non-ASCII
    b"mx.example.jp; dmarc=pass (unclosed",
])
def test_an_unreadable_header_of_ours_means_no_seal(world: dict[str, object],
                                                    value: bytes) -> None:
    message = b"Authentication-Results: " + value + b"\r\n" + MESSAGE
    result = seal(*_fields_and_hash(message), key=world["rsa"],  # type: ignore[arg-type]
                  authserv_id=AUTHSERV_ID, timestamp=T)
    assert isinstance(result, NotSealed) and "unreadable" in result.reason, result


def test_two_headers_of_ours_mean_no_seal(world: dict[str, object]) -> None:
    message = with_auth(with_auth(MESSAGE))
    result = seal(*_fields_and_hash(message), key=world["rsa"],  # type: ignore[arg-type]
                  authserv_id=AUTHSERV_ID, timestamp=T)
    assert isinstance(result, NotSealed) and "2 Authentication-Results" in result.reason


@pytest.mark.parametrize("kwargs, problem", [
    (dict(chain_status="pass", instance=1), "cannot be"),
    (dict(chain_status="none", instance=2), "cannot be"),
    (dict(chain_status="neutral", instance=1), "not none, pass or fail"),
    (dict(chain_status="fail", instance=51), "outside 1..50"),
    (dict(chain_status="fail", instance=0), "outside 1..50"),
])
def test_arc_set_refuses_sets_no_verifier_accepts(world: dict[str, object], kwargs: dict,
                                                  problem: str) -> None:
    fields, body_hash = _fields_and_hash(MESSAGE)
    with pytest.raises(ValueError, match=problem):
        arc_seal.arc_set(fields, body_hash, key=world["rsa"],  # type: ignore[arg-type]
                         auth_results_value=b"mx.example.jp; arc=none", timestamp=T, **kwargs)


def test_changed_reads_the_neutralize_mark_only() -> None:
    fields = fields_of(MESSAGE)[0]
    assert arc_seal.changed(fields) == ""
    assert arc_seal.changed(fields + [(b"X-Mailmoat-Neutralized", b" links=2")]) == \
        "X-Mailmoat-Neutralized"
    assert arc_seal.changed(fields + [(b"X-Mailmoat-Whatever", b" yes")]) == ""
