"""The auth milter behind a private Postfix and behind our own MTA, against a real Knot DNS
on loopback: SPF, DKIM (RSA from OpenDKIM's signer, ed25519 from dkimpy's), DMARC
verdicts, the Authentication-Results header, forged headers, DNS failures and bad From
headers. Postfix presents each client as a documentation address through XCLIENT."""
from __future__ import annotations

import email
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.dns_server import GarbageDnsServer, KnotServer, SilentDnsServer
from tests.harness.milter_proc import MilterProcess
from tests.harness.postfix import PostfixInstance, postfix_instance
from tests.harness.sink import SmtpSink
from tests.harness.swaks import SwaksResult, run_swaks
from tests.integration.auth_world import (AUTHSERV_ID, GOOD_IP, STRANGER_IP, Keys, make_keys,
                                          message, sign_ed25519, sign_opendkim, sign_rsa,
                                          zones)
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

POLICY = """\
internal_networks: [127.0.0.0/8]
auth:
  dmarc:
    reject_reply: "550 5.7.1 Rejected by DMARC policy (test)"
"""


def config_text(nameserver: str, timeout: str = "2s") -> str:
    return (f"gateway: {{hostname: {AUTHSERV_ID}}}\nstore: memory://\npolicy: policy.yaml\n"
            f"dns: {{nameservers: [\"{nameserver}\"], timeout: {timeout}}}\n")


def start_milter(workdir: Path, nameserver: str) -> MilterProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "policy.yaml").write_text(POLICY)
    config = workdir / "config.yaml"
    config.write_text(config_text(nameserver))
    return MilterProcess("auth", config, workdir).start()


@dataclass
class World:
    keys: Keys
    dns: KnotServer
    workdir: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("auth")
    keys = make_keys(workdir / "keys")
    with KnotServer(zones(keys), workdir) as dns:
        yield World(keys, dns, workdir)


@dataclass
class Gateway:
    postfix: PostfixInstance
    sink: SmtpSink
    milter: MilterProcess
    workdir: Path

    def send(self, raw: bytes, client: str = GOOD_IP, mail_from: str = "ceo@pass.test",
             helo: str = "mail.pass.test") -> SwaksResult:
        path = self.workdir / "outgoing.eml"
        path.write_bytes(raw)
        return run_swaks(self.postfix.smtp_port, mail_from=mail_from, rcpt="taro@example.jp",
                         xclient_addr=client, helo=helo, data_file=path)


@pytest.fixture(scope="module")
def gateway(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("auth-postfix")
    milter = start_milter(workdir, world.dns.nameserver)
    try:
        # As for clients from the Internet: Postfix adds no missing From or Date header
        # (it would for "local" clients, which the loopback peer is by default).
        with SmtpSink() as sink, postfix_instance(
                workdir, relay_port=sink.port, smtpd_milters=milter.socket_spec,
                extra={"local_header_rewrite_clients": ""}) as postfix:
            yield Gateway(postfix, sink, milter, workdir)
    finally:
        milter.stop()


def send_and_get(gateway: Gateway, raw: bytes, **kw: str) -> email.message.Message:
    before = len(gateway.sink.messages)
    result = gateway.send(raw, **kw)
    assert result.code("DATA_END") == 250, result.transcript
    messages = gateway.sink.wait_for(before + 1, timeout=10)
    return messages[before].message()


def last_auth_event(gateway: Gateway) -> str:
    """The milter's last `event=auth` log line: each check's result and what was done."""
    return [ln for ln in gateway.milter.log_text().splitlines() if "event=auth " in ln][-1]


def our_results(msg: email.message.Message) -> list[str]:
    return [re.sub(r"\s+", " ", str(v)) for v in msg.get_all("Authentication-Results") or []
            if str(v).strip().lower().startswith(AUTHSERV_ID)]


# -- verdicts through Postfix -------------------------------------------------------------
def test_rsa_signature_passes_dmarc_without_spf(world: World,
                                                             gateway: Gateway) -> None:
    signed = sign_rsa(message(subject="rsa"), "pass.test", world.keys, world.workdir)
    msg = send_and_get(gateway, signed, client=STRANGER_IP)
    (header,) = our_results(msg)
    assert "spf=fail" in header and "smtp.mailfrom=pass.test" in header
    assert re.search(r"dkim=pass \(rsa-sha256\) header\.d=pass\.test header\.s=rsa", header)
    assert re.search(r"dmarc=pass \(p=reject dis=NONE\) header\.from=pass\.test", header)
    # Ours is the first header of the message (inserted at the top, as OpenDKIM does).
    assert next(iter(msg.keys())) == "Authentication-Results"


def test_opendkim_rsa_sha1_signature_is_not_valid_rfc_8301(world: World,
                                                           gateway: Gateway) -> None:
    signed = sign_opendkim(message(subject="sha1"), "pass.test", world.keys, world.workdir)
    assert b"a=rsa-sha1" in signed
    result = gateway.send(signed, client=STRANGER_IP)
    assert result.reply_by_stage["DATA_END"].startswith("550 5.7.1"), result.transcript
    line = last_auth_event(gateway)
    assert "dkim=policy:pass.test" in line, line


def test_ed25519_signature_passes(world: World, gateway: Gateway) -> None:
    signed = sign_ed25519(message(subject="ed"), "pass.test", world.keys)
    (header,) = our_results(send_and_get(gateway, signed, client=STRANGER_IP))
    assert re.search(r"dkim=pass \(ed25519-sha256\) header\.d=pass\.test header\.s=ed", header)
    assert "dmarc=pass" in header


def test_spf_alone_passes_dmarc(gateway: Gateway) -> None:
    (header,) = our_results(send_and_get(gateway, message(subject="spf only")))
    assert "spf=pass" in header and "dkim=none" in header and "dmarc=pass" in header
    assert "smtp.helo=mail.pass.test" in header  # the HELO identity is reported too


@pytest.mark.parametrize("alteration", ["body", "subject"])
def test_altered_signed_message_is_rejected_per_p_reject(world: World, gateway: Gateway,
                                                        alteration: str) -> None:
    signed = sign_rsa(message(subject=f"to alter {alteration}"), "pass.test", world.keys,
                      world.workdir)
    altered = (signed.replace(b"figures below", b"figures changed") if alteration == "body"
               else signed.replace(b"Subject: to alter", b"Subject: TO ALTER"))
    assert altered != signed
    result = gateway.send(altered, client=STRANGER_IP)
    assert result.reply_by_stage["DATA_END"] == "550 5.7.1 Rejected by DMARC policy (test)", \
        result.transcript
    assert "action=reject" in gateway.milter.log_text()


def test_replayed_signature_of_another_domain_does_not_pass_dmarc(world: World,
                                                                 gateway: Gateway) -> None:
    """A valid signature by attacker.test on mail whose From says pass.test: DKIM passes,
    but it is not aligned with the From domain (RFC 7489 3.1.1), so p=reject applies."""
    signed = sign_rsa(message(subject="replay"), "attacker.test", world.keys, world.workdir)
    result = gateway.send(signed, client=STRANGER_IP, mail_from="bounce@attacker.test")
    assert result.reply_by_stage["DATA_END"].startswith("550 5.7.1"), result.transcript
    line = last_auth_event(gateway)
    assert "dkim=pass:attacker.test" in line and "spf=pass" in line, line


def test_length_tag_with_appended_content_is_not_a_pass(world: World,
                                                        gateway: Gateway) -> None:
    import dkim
    raw = message(subject="l= trick")
    header = dkim.sign(raw, b"ed", b"pass.test", world.keys.ed_private_b64,
                       signature_algorithm=b"ed25519-sha256", length=True,
                       include_headers=[b"from", b"subject"])
    appended = header + raw + b"\r\nClick http://phish.example/ now\r\n"
    result = gateway.send(appended, client=STRANGER_IP)
    assert result.reply_by_stage["DATA_END"].startswith("550 5.7.1"), result.transcript


def test_p_quarantine_failure_lands_in_postfix_hold_queue(gateway: Gateway) -> None:
    result = gateway.send(message("boss@quar.test", subject="quarantine me"),
                          client=STRANGER_IP, mail_from="boss@quar.test")
    assert result.code("DATA_END") == 250, result.transcript
    queue_id = re.search(r"queued as (\S+)", result.reply_by_stage["DATA_END"]).group(1)
    gateway.postfix.wait_for_log(rf"{queue_id}: milter-hold", timeout=10)
    held = [item for item in gateway.postfix.queue() if item.get("queue_id") == queue_id]
    assert held and held[0]["queue_name"] == "hold", gateway.postfix.queue()


def test_p_none_failure_is_delivered_tagged(gateway: Gateway) -> None:
    msg = send_and_get(gateway, message("news@none.test", subject="none"),
                       client=STRANGER_IP, mail_from="news@none.test")
    (header,) = our_results(msg)
    assert "dmarc=fail (p=none dis=NONE) header.from=none.test" in header


def test_forged_results_are_removed_and_foreign_ones_kept(gateway: Gateway) -> None:
    forged = message("news@none.test", subject="forged", extra=(
        f"Authentication-Results: {AUTHSERV_ID}; dmarc=pass header.from=none.test\r\n"
        f"Authentication-Results: MX.TEST (comment) 1; spf=pass\r\n"
        "Authentication-Results: other.example; dkim=pass header.d=none.test\r\n"))
    msg = send_and_get(gateway, forged, client=STRANGER_IP, mail_from="news@none.test")
    ours = our_results(msg)
    assert len(ours) == 1 and "dmarc=fail" in ours[0], ours
    foreign = [v for v in msg.get_all("Authentication-Results") if "other.example" in v]
    assert foreign == ["other.example; dkim=pass header.d=none.test"]
    assert "forged_removed=2" in gateway.milter.log_text()


@pytest.mark.parametrize("from_header,why", [
    (None, "no From header"),
    ("undisclosed-recipients:;", "no usable domain|0 addresses"),
])
def test_bad_from_header_is_tagged_permerror(gateway: Gateway, from_header: str | None,
                                             why: str) -> None:
    msg = send_and_get(gateway, message(from_header, subject=f"bad from {why}"))
    (header,) = our_results(msg)
    assert "dmarc=permerror" in header
    assert re.search(why, header), header


def test_forged_from_prepended_over_a_signed_message_is_rejected(world: World,
                                                                 gateway: Gateway) -> None:
    """RFC 7489 6.6.1, issue 13: attacker.test signs its own message (and passes SPF), then
    a From of pass.test (p=reject, unsigned) is put on top. Each author domain is judged and
    the strictest policy applies: rejected, and the log names the domain that failed."""
    signed = sign_rsa(message("news@attacker.test", subject="two authors"), "attacker.test",
                      world.keys, world.workdir)
    forged = b"From: CEO <ceo@pass.test>\r\n" + signed
    result = gateway.send(forged, client=STRANGER_IP, mail_from="bounce@attacker.test")
    assert result.reply_by_stage["DATA_END"] == "550 5.7.1 Rejected by DMARC policy (test)", \
        result.transcript
    line = last_auth_event(gateway)
    assert "action=reject" in line and "from=pass.test" in line, line
    assert re.search(r"dmarc_each=fail:pass\.test,\w+:attacker\.test", line), line


def test_two_from_headers_are_each_evaluated(gateway: Gateway) -> None:
    """RFC 7489 6.6.1: a p=none failure and a pass: tagged, one DMARC result per author."""
    msg = send_and_get(gateway, message("a@none.test\r\nFrom: b@pass.test",
                                        subject="two from"))
    (header,) = our_results(msg)
    assert "dmarc=fail (p=none dis=NONE) header.from=none.test" in header, header
    assert "dmarc=pass (p=reject dis=NONE) header.from=pass.test" in header, header


def test_broken_dmarc_record_is_permerror_and_not_enforced(gateway: Gateway) -> None:
    msg = send_and_get(gateway, message("x@broken.test", subject="broken record"),
                       client=STRANGER_IP, mail_from="x@broken.test")
    (header,) = our_results(msg)
    assert "dmarc=permerror" in header and "header.from=broken.test" in header


def test_internal_client_is_not_checked(gateway: Gateway) -> None:
    forged = message(subject="internal", extra=f"Authentication-Results: {AUTHSERV_ID}; "
                                               "dmarc=pass\r\n")
    msg = send_and_get(gateway, forged, client="127.0.0.5")
    assert our_results(msg) == []  # no header of ours, and the forged one is gone


def test_internationalised_from_domain_is_checked_as_its_a_label(gateway: Gateway) -> None:
    # RFC 6532: the header carries the domain in UTF-8; the display name is RFC 2047.
    raw = message("=?UTF-8?B?5ouF5b2T?= <tanto@例え.test>", subject="IDN")
    (header,) = our_results(send_and_get(gateway, raw, mail_from="tanto@xn--r8jz45g.test"))
    assert "dmarc=pass" in header and "header.from=xn--r8jz45g.test" in header, header


@pytest.mark.parametrize("trick,rejected", [
    # A folded From whose second line carries another address: two authors (RFC 7489
    # 6.6.1), pass.test's p=reject applies to the unaligned one: rejected (issue 13).
    ("From: ceo@pass.test\r\n <boss@none.test>", True),
    # A display name that looks like an address of another domain.
    ('From: "ceo@pass.test" <x@none.test>', False),
    # A comment holding an address, and a NUL-free control character.
    ("From: (ceo@pass.test) x@none.test\x0b", False),
])
def test_from_header_tricks_get_a_defined_verdict(gateway: Gateway, trick: str,
                                                  rejected: bool) -> None:
    raw = message(None, subject="trick", extra=trick + "\r\n")
    if rejected:
        result = gateway.send(raw, client=STRANGER_IP, mail_from="x@none.test")
        assert result.reply_by_stage["DATA_END"].startswith("550 5.7.1"), result.transcript
        assert "from=pass.test" in last_auth_event(gateway)
        return
    msg = send_and_get(gateway, raw, client=STRANGER_IP, mail_from="x@none.test")
    (header,) = our_results(msg)
    # Never a pass for pass.test on the strength of a display name or comment.
    assert "dmarc=pass" not in header, header
    assert re.search(r"dmarc=(fail|permerror)", header), header


def test_a_huge_header_gets_a_defined_verdict(gateway: Gateway) -> None:
    big = "X-Padding: " + "\r\n ".join(["a" * 900] * 1200)  # about 1 MB, folded
    msg = send_and_get(gateway, message(subject="huge", extra=big + "\r\n"))
    (header,) = our_results(msg)
    assert "dmarc=pass" in header  # SPF still passes; nothing crashed or timed out


# -- DNS failures -------------------------------------------------------------------------
@pytest.mark.parametrize("server_class", [SilentDnsServer, GarbageDnsServer])
def test_dns_failure_is_tempfail_451_4_4_3(tmp_path: Path, server_class: type) -> None:
    with server_class() as bad_dns:
        milter = start_milter(tmp_path, bad_dns.nameserver)
        try:
            with SmtpSink() as sink, postfix_instance(tmp_path, relay_port=sink.port,
                                                      smtpd_milters=milter.socket_spec) as pf:
                path = tmp_path / "m.eml"
                path.write_bytes(message(subject="dns down"))
                result = run_swaks(pf.smtp_port, mail_from="ceo@pass.test",
                                   rcpt="taro@example.jp", xclient_addr=STRANGER_IP,
                                   data_file=path)
        finally:
            milter.stop()
    assert result.reply_by_stage["DATA_END"].startswith("451 4.4.3"), result.transcript
    assert bad_dns.queries, "the milter never asked the DNS server"


# -- the same through our own MTA ---------------------------------------------------------
def test_our_mta_gives_the_same_verdicts_and_header(world: World, gateway: Gateway,
                                                    tmp_path: Path) -> None:
    cases = [
        (sign_rsa(message(subject="same rsa"), "pass.test", world.keys, world.workdir),
         STRANGER_IP, "ceo@pass.test"),
        (message("news@none.test", subject="same none"), STRANGER_IP, "news@none.test"),
        (message(subject="same spf"), GOOD_IP, "ceo@pass.test"),
    ]
    rejected = sign_rsa(message(subject="same reject"), "pass.test", world.keys,
                        world.workdir).replace(b"figures below", b"figures changed")
    with SmtpSink() as sink:
        serve = Serve(tmp_path, policy=POLICY, relay=f"smtp:[127.0.0.1]:{sink.port}",
                      milters="milters: [{name: auth}]\n"
                              + config_text(world.dns.nameserver).split("policy.yaml\n")[1])
        serve.config.write_text(serve.config.read_text().replace(
            "hostname: mx.mailmoat.test", f"hostname: {AUTHSERV_ID}"))
        serve.start()
        try:
            for raw, client, mail_from in cases:
                path = tmp_path / "case.eml"
                path.write_bytes(raw)
                before = len(sink.messages)
                ours = run_swaks(serve.port, mail_from=mail_from, rcpt="taro@example.jp",
                                 xclient_addr=client, helo="mail.pass.test", data_file=path)
                assert ours.code("DATA_END") == 250, ours.transcript
                via_mta = our_results(sink.wait_for(before + 1)[before].message())
                via_postfix = our_results(send_and_get(gateway, raw, client=client,
                                                       mail_from=mail_from))
                assert via_mta == via_postfix
            path = tmp_path / "case.eml"
            path.write_bytes(rejected)
            ours = run_swaks(serve.port, mail_from="ceo@pass.test", rcpt="taro@example.jp",
                             xclient_addr=STRANGER_IP, data_file=path)
            theirs = gateway.send(rejected, client=STRANGER_IP)
            assert ours.reply_by_stage["DATA_END"] == theirs.reply_by_stage["DATA_END"] \
                == "550 5.7.1 Rejected by DMARC policy (test)"
        finally:
            serve.stop()


# -- spam points for auth failures (ratelimit reads our header) ---------------------------
def test_spam_points_for_auth_failures_and_the_dmarc_report(world: World,
                                                             tmp_path: Path) -> None:
    """auth first, ratelimit second: ratelimit reads the auth milter's header at end of
    message and adds the points the policy gives dmarc=fail and spf=fail, once each. The
    auth milter tallies each evaluation in the shared SQLite store, and `mailmoat dmarc
    report` turns the tallies into RFC 7489 aggregate report XML."""
    import subprocess
    import sys

    from tests.harness.milter_proc import ROOT
    (tmp_path / "policy.yaml").write_text(POLICY + """\
  reports: {record: true}
ratelimit:
  points:
    auth_results: {dmarc=fail: 10, spf=fail: 2.5, dkim=policy: 100}
""")
    config = tmp_path / "config.yaml"
    config.write_text(config_text(world.dns.nameserver).replace(
        "store: memory://", f"store: sqlite:///{tmp_path}/state.db"))
    auth = MilterProcess("auth", config, tmp_path).start()
    ratelimit = MilterProcess("ratelimit", config, tmp_path).start()
    try:
        with SmtpSink() as sink, postfix_instance(
                tmp_path, relay_port=sink.port,
                smtpd_milters=f"{auth.socket_spec} {ratelimit.socket_spec}",
                extra={"local_header_rewrite_clients": ""}) as postfix:
            gateway = Gateway(postfix, sink, auth, tmp_path)
            failing = message("news@none.test", subject="points please",
                              extra=f"Authentication-Results: {AUTHSERV_ID}; dkim=policy\r\n")
            result = gateway.send(failing, client=STRANGER_IP, mail_from="news@none.test")
            assert result.code("DATA_END") == 250, result.transcript
            # A passing message from another client adds nothing.
            assert gateway.send(message(subject="fine")).code("DATA_END") == 250
            ratelimit.wait_for_log(r'event=points .*signal="dmarc=fail"', timeout=10)
    finally:
        ratelimit.stop()
        auth.stop()
    log = ratelimit.log_text()
    assert 'signal="dmarc=fail" added=10' in log and 'signal="spf=fail" added=2.5' in log, log
    # The forged dkim=policy in the incoming header was removed by auth, so it never counts.
    assert "dkim=policy" not in log
    shown = subprocess.run([sys.executable, "-m", "mta.cli", "ratelimit", "show", STRANGER_IP,
                            "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout
    assert re.search(r"points\s+12\.\d", shown), shown
    clean = subprocess.run([sys.executable, "-m", "mta.cli", "ratelimit", "show", GOOD_IP,
                            "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout
    assert "points" not in clean, clean

    def report(domain: str) -> ET.Element:
        today = time.strftime("%Y-%m-%d", time.gmtime())
        done = subprocess.run([sys.executable, "-m", "mta.cli", "dmarc", "report", "--domain",
                               domain, "--since", today, "--config", str(config)], cwd=ROOT,
                              capture_output=True, check=True)
        return ET.fromstring(done.stdout)

    failed = report("none.test")
    assert failed.findtext("policy_published/p") == "none"
    (row,) = failed.findall("record")
    assert row.findtext("row/source_ip") == STRANGER_IP
    assert row.findtext("row/count") == "1"
    assert [row.findtext(f"row/policy_evaluated/{k}") for k in ("disposition", "dkim", "spf")] \
        == ["none", "fail", "fail"]
    assert row.findtext("identifiers/header_from") == "none.test"
    assert row.findtext("auth_results/spf/result") == "fail"
    passed = report("pass.test")
    assert passed.findtext("policy_published/p") == "reject"
    (row,) = passed.findall("record")
    assert row.findtext("row/source_ip") == GOOD_IP
    assert row.findtext("row/policy_evaluated/spf") == "pass"


# -- a later milter trusts the auth milter's verdict, never the client's text (issue 13) ---
NEUTRALIZE_POLICY = """\
internal_networks: [127.0.0.0/8]
auth:
  dmarc:
    actions: {reject: tag, quarantine: tag, none: tag}
neutralize:
  trusted_domains: [pass.test]
  on_failure: drop
rules:
  - name: dmarc-not-passing
    when: {auth: {dmarc: [fail, none, permerror, temperror]}}
    then: {neutralize: neutralize}
defaults:
  neutralize: pass
"""


@pytest.fixture(scope="module")
def chain(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Postfix with auth, then neutralize: neutralize trusts pass.test when our header
    says dmarc=pass for it, so a forged pass would let its mail through untouched."""
    workdir = tmp_path_factory.mktemp("auth-chain")
    (workdir / "policy.yaml").write_text(NEUTRALIZE_POLICY)
    config = workdir / "config.yaml"
    config.write_text(config_text(world.dns.nameserver))
    milters = [MilterProcess(name, config, workdir).start() for name in ("auth", "neutralize")]
    try:
        with SmtpSink() as sink, postfix_instance(
                workdir, relay_port=sink.port,
                smtpd_milters=" ".join(m.socket_spec for m in milters),
                extra={"local_header_rewrite_clients": ""}) as postfix:
            yield Gateway(postfix, sink, milters[0], workdir)
    finally:
        for milter in milters:
            milter.stop()


@pytest.mark.parametrize("helo,mail_from,from_header", [
    ("x;dmarc=pass;header.from=pass.test", "ceo@pass.test", "ceo@pass.test"),
    ('x";dmarc=pass;x="', "ceo@pass.test", "ceo@pass.test"),
    ("(dmarc=pass)", "ceo@pass.test", "ceo@pass.test"),
    ("mail.example.test", "ceo@pass.test(x;dmarc=pass;header.from=pass.test)",
     "ceo@pass.test"),
    ("mail.example.test", 'ceo@pass.test(";dmarc=pass;x=")', "ceo@pass.test"),
    ("mail.example.test", "ceo@pass.test", "ceo@pass.test (dmarc=pass)"),
    ("mail.example.test", "ceo@pass.test", '"x; dmarc=pass" <ceo@pass.test>'),
    ("x\\;dmarc=pass", "ceo@pass.test(dmarc=pass)", "ceo@pass.test"),
])
def test_client_text_cannot_forge_a_verdict_for_a_later_milter(
        chain: Gateway, helo: str, mail_from: str, from_header: str) -> None:
    """A stranger sends as pass.test (DMARC fails: not in its SPF, unsigned) with a HELO,
    MAIL FROM or From crafted to put 'dmarc=pass' into our Authentication-Results. The
    neutralize milter after auth must still see the failing verdict and neutralize the
    message (before issue 13 a HELO of 'x;dmarc=pass;header.from=pass.test' read as a pass
    for the trusted pass.test, and the message went through untouched)."""
    from milters.neutralize.logic import MARK_HEADER
    before = len(chain.sink.messages)
    result = chain.send(message(from_header, subject=f"forge {helo} {mail_from}",
                                body="Log in at https://login.attacker.test/ now\r\n"),
                        client=STRANGER_IP, mail_from=mail_from, helo=helo)
    assert result.code("DATA_END") == 250, result.transcript
    delivered = chain.sink.wait_for(before + 1, timeout=30)[before].message()
    (header,) = our_results(delivered)
    assert "dmarc=fail" in header, header
    assert "rule=dmarc-not-passing" in str(delivered[MARK_HEADER]), delivered.as_string()
    texts = [part.get_payload(decode=True) or b"" for part in delivered.walk()
             if part.get_content_type() == "text/plain"]
    assert any(b"login[.]attacker[.]test" in text for text in texts), texts
