"""The sign milter seals what the neutralize milter changed, behind Postfix, as a real chain:
auth (writes our Authentication-Results) -> neutralize (rewrites, marks) -> sign (ARC set,
key by `mailmoat dkim keygen`, published in Knot). dkimpy's ARC verifier passes the chain on
the delivered bytes; outbound mail through the same chain gets DKIM, not ARC."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import dkim
import pytest

from tests.harness.dns_server import KnotServer
from tests.harness.milter_proc import MilterProcess
from tests.harness.postfix import PostfixInstance, postfix_instance
from tests.harness.sink import SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.auth_world import AUTHSERV_ID, STRANGER_IP, make_keys, zones
from tests.integration.test_neutralize_milter import phishing
from tests.integration.test_sign_dkim import keygen

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostfixInstance,
                                                                      SmtpSink, dict]]:
    workdir = tmp_path_factory.mktemp("sign-arc-chain")
    key, line = keygen(workdir, "a1", "rsa")
    record = "".join(part for part in line.split('"')[1::2]).encode()
    world = {**zones(make_keys(workdir / "auth-keys")), "example.jp": [line]}
    (workdir / "policy.yaml").write_text(f"""\
internal_networks: [127.0.0.0/8]
auth:
  dmarc: {{actions: {{reject: tag, quarantine: tag, none: tag}}}}
rules:
  - name: dmarc-not-passing
    when: {{auth: {{dmarc: [fail, none, permerror, temperror]}}}}
    then: {{neutralize: neutralize}}
defaults:
  neutralize: pass
sign:
  keys:
    - {{domain: example.jp, selector: a1, file: "{key}"}}
  arc: {{seal: changed, key: a1._domainkey.example.jp}}
""")
    with KnotServer(world, workdir) as dns:
        config = workdir / "config.yaml"
        config.write_text(f"gateway: {{hostname: {AUTHSERV_ID}}}\nstore: memory://\n"
                          f"policy: policy.yaml\n"
                          f"dns: {{nameservers: [\"{dns.nameserver}\"], timeout: 2s}}\n")
        milters = [MilterProcess(n, config, workdir).start()
                   for n in ("auth", "neutralize", "sign")]
        try:
            with SmtpSink() as sink, postfix_instance(
                    workdir, relay_port=sink.port,
                    smtpd_milters=" ".join(m.socket_spec for m in milters),
                    extra={"local_header_rewrite_clients": ""}) as postfix:
                yield postfix, sink, {b"a1._domainkey.example.jp.": record}
        finally:
            for milter in milters:
                milter.stop()


def send(chain, tmp_path: Path, raw: bytes, client: str | None) -> bytes:
    postfix, sink, _ = chain
    path = tmp_path / "m.eml"
    path.write_bytes(raw)
    before = len(sink.messages)
    result = run_swaks(postfix.smtp_port, mail_from="support@pass.test", rcpt="taro@example.jp",
                       xclient_addr=client, helo="mail.example.test", data_file=path)
    assert result.code("DATA_END") == 250, result.transcript
    return sink.wait_for(before + 1, timeout=60)[before].data


def test_neutralized_inbound_mail_is_arc_sealed_and_the_chain_verifies(chain, tmp_path):
    data = send(chain, tmp_path, phishing(None, "support@pass.test", []), STRANGER_IP)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"X-Mailmoat-Neutralized" in head and head.startswith(b"ARC-Seal:"), head[:600]
    assert b"DKIM-Signature" not in head  # inbound: sealed, not signed
    cv, results, reason = dkim.arc_verify(data, dnsfunc=lambda n, timeout=5: chain[2].get(n))
    assert cv == b"pass", (reason, results)
    assert b"cv=none" in head
    altered = data.replace(b"Your account", b"Your acc0unt")
    assert dkim.arc_verify(altered, dnsfunc=lambda n, timeout=5: chain[2].get(n))[0] == b"fail"


def test_outbound_mail_through_the_same_chain_is_signed_not_sealed(chain, tmp_path):
    raw = (b"From: Hanako <hanako@example.jp>\r\nTo: taro@example.jp\r\nSubject: hi\r\n"
           b"Date: Sun, 6 Dec 2026 10:00:00 +0900\r\nMessage-ID: <o.1@example.jp>\r\n\r\nhi\r\n")
    data = send(chain, tmp_path, raw, None)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"ARC-Seal" not in head
    assert dkim.verify(data, dnsfunc=lambda n, timeout=5: chain[2].get(n))


def test_our_auth_milter_trusts_our_seal_on_a_second_pass(chain, tmp_path):
    """The sealed message through the same chain again (our internal server's own gateway,
    say): the auth milter's ARC check passes on our seal although the neutralize edit broke
    the sender's DKIM, and the second seal continues the chain (i=2, cv=pass)."""
    first = send(chain, tmp_path, phishing(None, "support@pass.test", []), STRANGER_IP)
    # What the next hop receives: the message as delivered, without the sink's trace.
    second = send(chain, tmp_path, first, STRANGER_IP)
    head = second.split(b"\r\n\r\n", 1)[0]
    ours = [line for line in head.replace(b"\r\n\t", b" ").split(b"\r\n") if re.match(
        rb"Authentication-Results:\s*" + re.escape(AUTHSERV_ID.encode()) + rb";", line)]
    assert len(ours) == 1 and b"arc=pass" in ours[0], head.decode("latin-1")[:3000]
    assert re.search(rb"ARC-Seal: i=2; a=rsa-sha256; t=\d+; cv=pass;", head), head[:800]
    cv, results, reason = dkim.arc_verify(second, dnsfunc=lambda n, timeout=5: chain[2].get(n))
    assert cv == b"pass" and len(results) == 2, (reason, results)
