"""The sign milter signs what leaves, and two verifiers that are not ours agree: OpenDKIM
(Debian, verify mode, keys from our Knot DNS server) and dkimpy, RSA and ed25519, through
`mailmoat serve` and behind a private Postfix, for plain mail and for the ZIP copy and the
password notice the attachments milter hands back (re-injected, signed on the way out).

    swaks ─▶ gateway (serve, or Postfix + milters) ─▶ Postfix + OpenDKIM (verify) ─▶ sink

Keys come from `mailmoat dkim keygen`, the zone from the records it prints, and
`mailmoat dkim check` reads them back through the same DNS server.
"""
from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import dkim
import pytest

from tests.harness.dns_server import KnotServer
from tests.harness.milter_proc import ROOT, MilterProcess, reinjecting_config
from tests.harness.opendmarc import OpenDkimVerifier
from tests.harness.postfix import PostfixInstance, postfix_instance
from tests.harness.sink import SinkMessage, SmtpSink
from tests.harness.swaks import run_swaks
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

SAMPLE = ROOT / "samples" / "ppap-attachment-ja.eml"
SENDER, EXTERNAL, INTERNAL = "hanako@example.jp", "buyer@customer.example", "taro@example.jp"
PEER_ID = "verifier.test"
DOMAINS = "example.jp, customer.example"


def mailmoat(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mta.cli", *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=60)


def keygen(workdir: Path, selector: str, kind: str) -> tuple[Path, str]:
    """A key by `mailmoat dkim keygen` and its zone line, read from what keygen prints."""
    done = mailmoat("dkim", "keygen", "--domain", "example.jp", "--selector", selector,
                    "--type", kind, cwd=workdir)
    assert done.returncode == 0, done.stderr
    record = re.search(r"^(\S+)\._domainkey\.example\.jp\. IN TXT (\(.*\))$", done.stdout,
                       re.MULTILINE)
    assert record is not None, done.stdout
    return workdir / f"example.jp.{selector}.key", f"{record[1]}._domainkey 300 IN TXT {record[2]}"


@dataclass
class World:
    workdir: Path
    keys: dict[str, Path]
    dns: KnotServer
    records: dict[bytes, bytes]  # name -> TXT value, for dkimpy
    verifier: PostfixInstance  # Postfix with OpenDKIM (verify), relaying to the sink
    sink: SmtpSink


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("sign")
    rsa_file, rsa_line = keygen(workdir, "r1", "rsa")
    ed_file, ed_line = keygen(workdir, "e1", "ed25519")
    zone = {"example.jp": [rsa_line, ed_line, 'revoked._domainkey 300 IN TXT "v=DKIM1; p="']}
    records = {}
    for line in (rsa_line, ed_line):
        name = line.split()[0]
        records[f"{name}.example.jp.".encode()] = "".join(
            re.findall(r'"([^"]*)"', line)).encode()
    verifier_dir = workdir / "verifier"
    verifier_dir.mkdir()
    with KnotServer(zone, workdir) as dns, \
            OpenDkimVerifier(dns, verifier_dir, authserv_id=PEER_ID) as opendkim, \
            SmtpSink() as sink, \
            postfix_instance(verifier_dir, relay_port=sink.port,
                             smtpd_milters=opendkim.socket_spec, relay_domains=DOMAINS,
                             extra={"local_header_rewrite_clients": ""}) as verifier:
        yield World(workdir, {"r1": rsa_file, "e1": ed_file}, dns, records, verifier, sink)


def policy(world: World) -> str:
    return f"""\
internal_networks: [127.0.0.0/8]
attachments:
  notice: {{to: sender, language: ja, sender: postmaster@example.jp}}
sign:
  keys:
    - {{domain: example.jp, selector: r1, file: "{world.keys['r1']}"}}
    - {{domain: example.jp, selector: e1, file: "{world.keys['e1']}"}}
rules:
  - name: external-recipients-get-a-zip
    when: {{direction: outbound, recipient: ["*", "!@example.jp"]}}
    then: {{attachments: encrypt}}
"""


def checked(world: World, item: SinkMessage) -> dict[str, str]:
    """selector -> OpenDKIM's result and dkimpy's, for every signature on the message."""
    parsed = email.message_from_bytes(item.data, policy=email.policy.compat32)
    results: dict[str, str] = {}
    for header in parsed.get_all("Authentication-Results") or []:
        text = re.sub(r"\s+", " ", str(header))
        if text.startswith(PEER_ID + ";"):
            # "dkim=pass (2048-bit key; unprotected) header.d=... header.s=r1"
            for found in re.finditer(r"dkim=(\w+)(?: \([^)]*\))?[^;]*?header\.s=(\w+)", text):
                results[found[2]] = f"opendkim={found[1]}"
    verifier = dkim.DKIM(item.data)
    signatures = [v for k, v in parsed.items() if k.lower() == "dkim-signature"]
    for index, value in enumerate(signatures):
        selector = re.search(r"\bs=(\w+)", value)[1]  # type: ignore[index]
        ok = verifier.verify(idx=index, dnsfunc=lambda name, timeout=5:
                             world.records.get(name))
        results[selector] = results.get(selector, "opendkim=(none)") + (
            " dkimpy=pass" if ok else " dkimpy=fail")
    return results


BOTH_PASS = {"r1": "opendkim=pass dkimpy=pass", "e1": "opendkim=pass dkimpy=pass"}


def deliveries(world: World, before: int, count: int) -> dict[str, SinkMessage]:
    """The next `count` messages at the sink, by what they are: zip, original, notice."""
    items = world.sink.wait_for(before + count, timeout=60)[before:]
    out = {}
    for item in items:
        text = item.data
        if INTERNAL in item.rcpt_tos:
            out["original"] = item
        elif SENDER in item.rcpt_tos:
            out["notice"] = item
        else:
            assert b".zip" in text, text[:400]
            out["zip"] = item
    assert len(out) == count, out
    return out


def test_mail_copies_and_notices_through_serve_verify_with_opendkim_and_dkimpy(
        world: World, tmp_path: Path) -> None:
    serve = Serve(tmp_path, policy=policy(world),
                  relay=f"smtp:[127.0.0.1]:{world.verifier.smtp_port}",
                  milters="milters: [{name: attachments}, {name: sign}]\n")
    serve.config.write_text(serve.config.read_text().replace(
        "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]"))
    serve.start()
    before = len(world.sink.messages)
    try:
        result = run_swaks(serve.port, mail_from=SENDER, rcpt=[EXTERNAL, INTERNAL],
                           data_file=SAMPLE)
        assert result.code("DATA_END") == 250, result.transcript
        got = deliveries(world, before, 3)
    finally:
        serve.stop()
    for what, item in got.items():
        assert checked(world, item) == BOTH_PASS, (what, item.data[:1500].decode("ascii", "replace"))
    assert len(re.findall(r"event=signed ", serve.text())) == 3, serve.text()


def test_the_same_through_postfix_with_sign_on_its_reinjection_smtpd(
        world: World, tmp_path: Path) -> None:
    config, reinject_port = reinjecting_config(tmp_path, policy(world))
    attachments = MilterProcess("attachments", config, tmp_path).start()
    sign = MilterProcess("sign", config, tmp_path).start()
    before = len(world.sink.messages)
    try:
        with postfix_instance(tmp_path, relay_port=world.verifier.smtp_port,
                              smtpd_milters=f"{attachments.socket_spec} {sign.socket_spec}",
                              reinject_port=reinject_port, reinject_milters=sign.socket_spec,
                              relay_domains=DOMAINS) as gateway:
            result = run_swaks(gateway.smtp_port, mail_from=SENDER,
                               rcpt=[EXTERNAL, INTERNAL], data_file=SAMPLE)
            assert result.code("DATA_END") == 250, result.transcript
            got = deliveries(world, before, 3)
    finally:
        attachments.stop()
        sign.stop()
    for what, item in got.items():
        assert checked(world, item) == BOTH_PASS, (what, item.data[:1500].decode("ascii", "replace"))


def _send_plain(world: World, tmp_path: Path, raw: bytes, rcpt: str = INTERNAL) -> SinkMessage:
    """One message through a sign milter behind Postfix, to the verifier."""
    (tmp_path / "policy.yaml").write_text(policy(world))
    config = tmp_path / "config.yaml"
    config.write_text("gateway: {hostname: mx.example.jp}\nstore: memory://\n"
                      "policy: policy.yaml\n")
    sign = MilterProcess("sign", config, tmp_path).start()
    before = len(world.sink.messages)
    try:
        with postfix_instance(tmp_path, relay_port=world.verifier.smtp_port,
                              smtpd_milters=sign.socket_spec, relay_domains=DOMAINS) as gw:
            path = tmp_path / "m.eml"
            path.write_bytes(raw)
            result = run_swaks(gw.smtp_port, mail_from=SENDER, rcpt=rcpt, data_file=path)
            assert result.code("DATA_END") == 250, result.transcript
            return world.sink.wait_for(before + 1, timeout=60)[before]
    finally:
        sign.stop()
        (tmp_path / "sign.log").write_text(sign.log_path.read_text())


PLAIN = (b"From: Hanako <hanako@example.jp>\r\nTo: taro@example.jp\r\nSubject: plain\r\n"
         b"Date: Sun, 6 Dec 2026 10:00:00 +0900\r\nMessage-ID: <plain.1@example.jp>\r\n"
         b"\r\nHello  \t there \r\n\r\n\r\n")


def test_a_from_added_after_signing_fails_at_dkimpy_and_opendkim(world: World,
                                                                  tmp_path: Path) -> None:
    item = _send_plain(world, tmp_path, PLAIN)
    assert checked(world, item) == BOTH_PASS
    head, body = item.data.split(b"\r\n\r\n", 1)
    forged = head + b"\r\nFrom: ceo@example.jp\r\n\r\n" + body
    verifier = dkim.DKIM(forged)
    assert not any(verifier.verify(idx=i, dnsfunc=lambda n, timeout=5: world.records.get(n))
                   for i in range(2))


def test_a_from_domain_without_a_key_leaves_unsigned_and_says_so(world: World,
                                                                 tmp_path: Path) -> None:
    item = _send_plain(world, tmp_path, PLAIN.replace(b"hanako@example.jp", b"h@other.example"))
    assert b"DKIM-Signature" not in item.data.split(b"\r\n\r\n")[0]
    assert "event=sign_skipped" in (tmp_path / "sign.log").read_text()
    assert "no key for other.example" in (tmp_path / "sign.log").read_text()


def test_a_from_with_two_addresses_is_left_unsigned(world: World, tmp_path: Path) -> None:
    raw = PLAIN.replace(b"Hanako <hanako@example.jp>", b"hanako@example.jp, ceo@example.jp")
    item = _send_plain(world, tmp_path, raw)
    assert b"DKIM-Signature" not in item.data.split(b"\r\n\r\n")[0]
    assert "From holds 2 addresses" in (tmp_path / "sign.log").read_text()


def test_a_world_readable_key_stops_the_milter_with_a_clear_error(world: World,
                                                                  tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(world.keys["r1"].read_bytes())
    os.chmod(loose, 0o644)
    (tmp_path / "policy.yaml").write_text(
        f"sign:\n  keys:\n    - {{domain: example.jp, selector: r1, file: \"{loose}\"}}\n")
    done = mailmoat("policy", "check", str(tmp_path / "policy.yaml"), cwd=tmp_path)
    assert done.returncode == 1
    assert re.search(r"policy\.yaml:3:7: sign\.keys\[0\]: key file .*loose\.key is readable "
                     r"or writable by others than its owner \(mode 0644\)", done.stdout
                     + done.stderr), done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_dkim_check_says_match_mismatch_missing_revoked(world: World, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"dns: {{nameservers: [\"{world.dns.nameserver}\"], timeout: 2s}}\n")

    def check(selector: str, key: Path) -> tuple[int, str]:
        done = mailmoat("dkim", "check", "--domain", "example.jp", "--selector", selector,
                        "--key", str(key), "--config", str(config), cwd=tmp_path)
        return done.returncode, done.stdout + done.stderr

    assert check("r1", world.keys["r1"])[0] == 0
    assert "match" in check("e1", world.keys["e1"])[1]
    code, text = check("r1", world.keys["e1"])
    assert code == 1 and "mismatch" in text
    code, text = check("nosuch", world.keys["r1"])
    assert code == 1 and "missing" in text
    code, text = check("revoked", world.keys["r1"])
    assert code == 1 and "revoked" in text


@pytest.mark.parametrize("through", ["serve", "postfix"])
def test_a_body_the_attachments_milter_replaced_in_place_is_signed_as_it_leaves(
        world: World, tmp_path: Path, through: str) -> None:
    """One external recipient: no split, the ZIP replaces the body in the message itself,
    before the sign milter sees it (Postfix and our MTA hand each milter the edits of the
    ones before it)."""
    before = len(world.sink.messages)
    if through == "serve":
        serve = Serve(tmp_path, policy=policy(world),
                      relay=f"smtp:[127.0.0.1]:{world.verifier.smtp_port}",
                      milters="milters: [{name: attachments}, {name: sign}]\n")
        serve.config.write_text(serve.config.read_text().replace(
            "relay_domains: [example.jp]", "relay_domains: [example.jp, customer.example]"))
        serve.start()
        try:
            result = run_swaks(serve.port, mail_from=SENDER, rcpt=EXTERNAL, data_file=SAMPLE)
            assert result.code("DATA_END") == 250, result.transcript
            got = deliveries(world, before, 2)
        finally:
            serve.stop()
    else:
        config, reinject_port = reinjecting_config(tmp_path, policy(world))
        attachments = MilterProcess("attachments", config, tmp_path).start()
        sign = MilterProcess("sign", config, tmp_path).start()
        try:
            with postfix_instance(tmp_path, relay_port=world.verifier.smtp_port,
                                  smtpd_milters=f"{attachments.socket_spec} {sign.socket_spec}",
                                  reinject_port=reinject_port,
                                  reinject_milters=sign.socket_spec,
                                  relay_domains=DOMAINS) as gateway:
                result = run_swaks(gateway.smtp_port, mail_from=SENDER, rcpt=EXTERNAL,
                                   data_file=SAMPLE)
                assert result.code("DATA_END") == 250, result.transcript
                got = deliveries(world, before, 2)
        finally:
            attachments.stop()
            sign.stop()
    assert set(got) == {"zip", "notice"}
    for what, item in got.items():
        assert checked(world, item) == BOTH_PASS, (what, item.data[:1500])
