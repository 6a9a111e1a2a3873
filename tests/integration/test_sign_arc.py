"""ARC sets from milters.sign.arc_seal on mail that went through the real auth milter behind a
private Postfix, with the sealing key published in a real Knot DNS on loopback: the first
pass writes the Authentication-Results we seal, the message is then changed the way the
neutralize milter changes it (a link rewritten: the sender's DKIM signature breaks), sealed,
and sent through the gateway again. The second pass (our auth milter, reading the key from
DNS) and dkimpy's ARC verifier (same DNS) must both call the chain valid; a sealed message
altered afterwards must fail both."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from milters.sign.arc_seal import Sealed, seal
from milters.sign.dkim_sign import SigningKey, canonical_body_hash
from tests.harness.dns_server import KnotServer
from tests.harness.milter_proc import MilterProcess
from tests.harness.postfix import postfix_instance
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.auth_world import (AUTHSERV_ID, GOOD_IP, Keys, make_keys, message,
                                          sign_rsa, zones)
from tests.integration.test_auth_milter import config_text

pytestmark = pytest.mark.integration

SEALER = "seal.test"  # our sealing domain
FORWARDER = "fwd.test"  # a mailing list that sealed before us
POLICY = "internal_networks: [127.0.0.0/8]\n"
T = 1_700_000_000


@dataclass
class Gateway:
    keys: Keys
    dns: KnotServer
    sink: SmtpSink
    port: int
    milter: MilterProcess
    workdir: Path

    def send(self, raw: bytes, name: str = "out.eml") -> bytes:
        """Through Postfix and the auth milter to the sink; the bytes delivered."""
        path = self.workdir / name
        path.write_bytes(raw)
        before = len(self.sink.messages)
        result = run_swaks(self.port, mail_from="ceo@pass.test", rcpt="taro@example.jp",
                           xclient_addr=GOOD_IP, helo="mail.pass.test", data_file=path)
        assert result.code("DATA_END") == 250, result.transcript
        return self.sink.wait_for(before + 1, timeout=10)[before].data

    def txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's dnsfunc, asking the test DNS server."""
        text = name.decode() if isinstance(name, bytes) else name
        query = dns.message.make_query(text, dns.rdatatype.TXT)
        answer = dns.query.udp(query, self.dns.address, port=self.dns.port, timeout=timeout)
        for rrset in answer.answer:
            for record in rrset:
                return b"".join(record.strings)  # type: ignore[attr-defined]
        return None


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("sign-arc")
    keys = make_keys(workdir / "keys")
    world = zones(keys)
    record = next(r for r in world["pass.test"] if r.startswith("rsa._domainkey"))
    world[SEALER] = [record.replace("rsa._domainkey", "arc._domainkey", 1)]
    world[FORWARDER] = [record.replace("rsa._domainkey", "fwd._domainkey", 1)]
    with KnotServer(world, workdir) as server:
        (workdir / "policy.yaml").write_text(POLICY)
        config = workdir / "config.yaml"
        config.write_text(config_text(server.nameserver))
        milter = MilterProcess("auth", config, workdir).start()
        try:
            with SmtpSink() as sink, postfix_instance(
                    workdir, relay_port=sink.port, smtpd_milters=milter.socket_spec,
                    extra={"local_header_rewrite_clients": ""}) as postfix:
                yield Gateway(keys, server, sink, postfix.smtp_port, milter, workdir)
        finally:
            milter.stop()


def sealing_key(keys: Keys) -> SigningKey:
    private = load_pem_private_key(keys.rsa_private.read_bytes(), password=None)
    return SigningKey(SEALER, "arc", "rsa-sha256", private)  # type: ignore[arg-type]


def fields_of(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1] = (fields[-1][0], fields[-1][1] + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields, body


def neutralized(raw: bytes) -> bytes:
    """What the neutralize milter does to a link in a text body (the signed body changes)."""
    changed = raw.replace(b"https://example.com/figures", b"hxxps://example[.]com/figures")
    assert changed != raw
    return changed


def sealed(gateway: Gateway, raw: bytes) -> tuple[bytes, Sealed]:
    fields, body = fields_of(raw)
    result = seal(fields, canonical_body_hash([body], "relaxed"),
                  key=sealing_key(gateway.keys), authserv_id=AUTHSERV_ID, timestamp=T)
    assert isinstance(result, Sealed), result
    return b"".join(n + b":" + v + b"\r\n" for n, v in result.fields) + raw, result


def our_results(raw: bytes) -> str:
    """The value of the auth milter's own Authentication-Results, unfolded."""
    fields, _ = fields_of(raw)
    found = [v.decode() for n, v in fields if n.lower() == b"authentication-results"
             and v.strip().lower().startswith(AUTHSERV_ID.encode())]
    assert len(found) == 1, found
    return re.sub(r"\s+", " ", found[0])


def arc_of(results: str) -> str:
    match = re.search(r"\barc=(\w+)(?: \(([^)]*)\))?", results)
    assert match, results
    return f"{match.group(1)} {match.group(2) or ''}".strip()


BODY = "The figures: https://example.com/figures\r\n"


def first_pass(gateway: Gateway, subject: str, forwarder: Callable[[bytes], bytes] | None = None
               ) -> bytes:
    signed = sign_rsa(message(subject=subject, body=BODY), "pass.test", gateway.keys)
    if forwarder is not None:
        signed = forwarder(signed)
    delivered = gateway.send(signed)
    assert "dkim=pass" in our_results(delivered)
    return delivered


def test_a_first_seal_passes_our_auth_milter_and_dkimpy_after_our_edit(
        gateway: Gateway) -> None:
    delivered = first_pass(gateway, "first hop")
    assert arc_of(our_results(delivered)) == "none"
    message_, result = sealed(gateway, neutralized(delivered))
    assert b"cv=none" in result.fields[0][1]
    again = gateway.send(message_)
    results = our_results(again)
    assert "dkim=fail" in results  # our edit broke the sender's signature ...
    assert arc_of(results) == f"pass sealed by {SEALER}"  # ... the seal vouches for it
    cv, sets, reason = dkim.arc_verify(again, dnsfunc=gateway.txt)
    assert cv == b"pass", reason
    # the next hop reads the verdicts we sealed: DKIM passed before our change
    assert b"dkim=pass" in sets[0]["aar-value"] and b"i=1; mx.test;" in sets[0]["aar-value"]


@pytest.mark.parametrize("alteration", ["body", "subject", "a second From"])
def test_a_sealed_message_altered_afterwards_fails_both_verifiers(gateway: Gateway,
                                                                  alteration: str) -> None:
    message_, _ = sealed(gateway, neutralized(first_pass(gateway, f"alter {alteration}")))
    altered = {
        "body": lambda m: m.replace(b"The figures", b"The fixed figures"),
        "subject": lambda m: m.replace(b"Subject: alter", b"Subject: ALTER"),
        "a second From": lambda m: m.replace(b"To: taro", b"From: boss@seal.test\r\nTo: taro"),
    }[alteration](message_)
    assert altered != message_
    cv, _, _ = dkim.arc_verify(altered, dnsfunc=gateway.txt)
    assert cv != b"pass"
    assert arc_of(our_results(gateway.send(altered))).startswith("fail")


def test_an_incoming_valid_chain_is_continued_with_cv_pass(gateway: Gateway) -> None:
    pem = gateway.keys.rsa_private.read_bytes()

    def mailing_list(raw: bytes) -> bytes:
        checked = b"Authentication-Results: mx.fwd.test; spf=pass smtp.mailfrom=pass.test\r\n" \
            + raw
        return b"".join(dkim.arc_sign(checked, b"fwd", FORWARDER.encode(), pem,
                                      b"mx.fwd.test", timestamp=T - 60)) + checked

    delivered = first_pass(gateway, "via a list", mailing_list)
    assert arc_of(our_results(delivered)) == f"pass sealed by {FORWARDER}"
    message_, result = sealed(gateway, neutralized(delivered))
    assert b"i=2;" in result.fields[0][1] and b"cv=pass" in result.fields[0][1]
    again = gateway.send(message_)
    assert arc_of(our_results(again)) == f"pass sealed by {SEALER}, {FORWARDER}"
    cv, sets, reason = dkim.arc_verify(again, dnsfunc=gateway.txt)
    assert cv == b"pass" and len(sets) == 2, reason


def test_an_incoming_broken_chain_is_sealed_cv_fail_and_stays_failed(gateway: Gateway) -> None:
    pem = gateway.keys.rsa_private.read_bytes()

    def broken_list(raw: bytes) -> bytes:
        checked = b"Authentication-Results: mx.fwd.test; spf=pass smtp.mailfrom=pass.test\r\n" \
            + raw
        sealed_ = b"".join(dkim.arc_sign(checked, b"fwd", FORWARDER.encode(), pem,
                                         b"mx.fwd.test", timestamp=T - 60)) + checked
        # the list's recorded verdict edited after its seal: its ARC-Seal no longer holds
        assert b"\r\n spf=pass" in sealed_
        return sealed_.replace(b"\r\n spf=pass", b"\r\n spf=fail", 1)

    delivered = first_pass(gateway, "via a broken list", broken_list)
    assert arc_of(our_results(delivered)).startswith("fail")
    message_, result = sealed(gateway, neutralized(delivered))
    assert b"i=2;" in result.fields[0][1] and b"cv=fail" in result.fields[0][1]
    again = gateway.send(message_)
    assert arc_of(our_results(again)).startswith("fail")
    cv, _, _ = dkim.arc_verify(again, dnsfunc=gateway.txt)
    assert cv != b"pass"
