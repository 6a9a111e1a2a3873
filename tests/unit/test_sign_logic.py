"""The sign milter's logic without sockets: which mail is signed with which keys, what is
left unsigned (and logged), what the signatures cover; every signature checked by dkimpy."""
from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from milters.core.edits import AddHeader
from milters.core.errors import ConfigError
from milters.core.message import Envelope, Message, Recipient
from milters.core.policy.document import load_policy_text
from milters.core.dkim_keys import public_record
from milters.sign.logic import Signer
from mta.cli import EXTENSIONS

NOW = 1796560000


def _write(path: Path, key: object, mode: int = 0o600) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                            serialization.PrivateFormat.TraditionalOpenSSL
                            if isinstance(key, rsa.RSAPrivateKey)
                            else serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.write_bytes(pem)
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    files = {"rsa": _write(tmp / "rsa.key", rsa_key), "ed": _write(tmp / "ed.key", ed_key)}
    dns = {b"r1._domainkey.example.com.": public_record(rsa_key).encode(),
           b"e1._domainkey.example.com.": public_record(ed_key).encode()}
    return {"tmp": tmp, "files": files, "dns": dns, "rsa": rsa_key}


def policy_for(world: dict, extra: str = "") -> object:
    files = world["files"]
    return load_policy_text(f"""\
internal_networks: [127.0.0.0/8, 10.0.0.0/8]
sign:
  keys:
    - {{domain: example.com, selector: r1, file: "{files['rsa']}"}}
    - {{domain: example.com, selector: e1, file: "{files['ed']}"}}
  domains: {{example.org: example.com}}
{extra}""", EXTENSIONS)


MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
           b"Subject: report\r\nDate: Sun, 6 Dec 2026 10:00:00 +0000\r\n"
           b"Message-ID: <1@example.com>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nHello  there\r\n\r\n")


def env(ip: str = "10.1.2.3", auth_user: str | None = None) -> Envelope:
    return Envelope(client_ip=ip, mail_from="alice@example.com", auth_user=auth_user,
                    recipients=[Recipient("bob@example.net")])


def run(world: dict, raw: bytes, envelope: Envelope | None = None, extra: str = "") -> tuple[
        bytes, list[AddHeader]]:
    policy = policy_for(world, extra)
    message = Message(raw=raw, envelope=envelope or env())
    result = Signer(clock=lambda: NOW).sign_message(policy, message)
    edits = [e for e in result.edits if isinstance(e, AddHeader)]
    return on_top(edits, raw), edits


def on_top(edits: list[AddHeader], raw: bytes) -> bytes:
    """Each edit inserted at the top in turn (index 0), as an MTA under HDR_LEADSPC writes
    it: "Name:" + the value with its own space."""
    for e in edits:
        assert e.index == 0
        raw = f"{e.name}:{e.value}".replace("\n", "\r\n").encode() + b"\r\n" + raw
    return raw


def verify_all(world: dict, signed: bytes) -> list[bool]:
    """dkimpy's verdict on each signature, top first."""
    count = signed.split(b"\r\n\r\n")[0].lower().count(b"\ndkim-signature:") + (
        signed.lower().startswith(b"dkim-signature:"))
    verifier = dkim.DKIM(signed)
    return [bool(verifier.verify(idx=i, dnsfunc=lambda n, timeout=5: world["dns"].get(n)))
            for i in range(count)]


def test_outbound_mail_is_signed_with_rsa_and_ed25519_and_both_verify(world):
    signed, edits = run(world, MESSAGE)
    assert [e.name for e in edits] == ["DKIM-Signature", "DKIM-Signature"]
    assert all(e.index == 0 for e in edits)
    assert {b"a=rsa-sha256" in signed, b"a=ed25519-sha256" in signed} == {True}
    assert verify_all(world, signed) == [True, True]


def test_smtp_auth_users_count_as_outbound(world):
    signed, edits = run(world, MESSAGE, env("192.0.2.9", auth_user="alice"))
    assert len(edits) == 2 and verify_all(world, signed) == [True, True]


def test_inbound_mail_is_not_signed(world):
    _, edits = run(world, MESSAGE, env("192.0.2.9"))
    assert edits == []


def test_the_signature_covers_and_oversigns_from_and_has_t_and_no_l(world):
    _, edits = run(world, MESSAGE)
    value = edits[0].value.replace("\n\t", "")
    tags = dict(t.strip().split("=", 1) for t in value.split(";"))
    names = tags["h"].split(":")
    assert names.count("from") == 2 and names.count("subject") == 2
    assert "cc" in names and "reply-to" in names  # absent, over-signed: none may be added
    assert tags["t"] == str(NOW) and "l" not in tags and "x" not in tags
    assert tags["c"] == "relaxed/relaxed" and tags["d"] == "example.com"


def test_a_from_added_after_signing_breaks_every_signature(world):
    signed, _ = run(world, MESSAGE)
    forged = signed.replace(b"From: Alice", b"From: ceo@example.com\r\nFrom: Alice", 1)
    assert verify_all(world, forged) == [False, False]


@pytest.mark.parametrize("canon", ["simple/simple", "relaxed/simple", "simple/relaxed"])
def test_the_other_canonicalizations_verify_too(world, canon):
    signed, edits = run(world, MESSAGE, extra=f"  canonicalization: {canon}\n")
    assert f"c={canon}" in edits[0].value and verify_all(world, signed) == [True, True]


def test_expire_writes_x(world):
    _, edits = run(world, MESSAGE, extra="  expire: 7d\n")
    assert f"x={NOW + 7 * 86400}" in edits[0].value.replace("\n\t", "")


def test_a_subdomain_signs_with_its_parents_keys_and_the_table_maps_other_domains(world):
    for author in (b"a@mail.example.com", b"a@example.org", b"a@mail.example.org"):
        raw = MESSAGE.replace(b"alice@example.com", author)
        signed, edits = run(world, raw)
        assert len(edits) == 2 and verify_all(world, signed) == [True, True], author


def test_subdomains_off_leaves_a_subdomain_unsigned(world):
    raw = MESSAGE.replace(b"alice@example.com", b"a@mail.example.com")
    assert run(world, raw, extra="  subdomains: false\n")[1] == []


@pytest.mark.parametrize("from_value", [
    b"a@example.com, b@example.com",  # two authors
    b"\"alice@example.com\" <mallory@evil.example>",  # our address as a display name
    b"mallory@evil.example (alice@example.com)",  # ... as a comment
    b"=?utf-8?q?alice=40example.com?= <mallory@evil.example>",  # ... encoded
    b"alice@example.com@evil.example",  # two @
    b"<alice@example.com>mallory@evil.example",  # junk after the address
    b"alice@exa mple.com",
    b"alice@example.com\rBcc: mallory@evil.example",  # a bare CR: no second field
    b"alice@example.com\x00",
    b"undisclosed-recipients:;",  # a group without a mailbox
    b"",
])
def test_a_from_that_is_not_exactly_one_of_our_mailboxes_is_left_unsigned_and_logged(
        world, from_value, caplog):
    raw = MESSAGE.replace(b"Alice <alice@example.com>", from_value)
    with caplog.at_level(logging.INFO, logger="mailmoat"):
        _, edits = run(world, raw)
    assert edits == []
    assert "sign_skipped" in caplog.text


def test_two_from_fields_are_left_unsigned(world):
    raw = MESSAGE.replace(b"To:", b"From: alice@example.com\r\nTo:", 1)
    assert run(world, raw)[1] == []


def test_a_from_domain_without_a_key_is_unsigned_and_logged(world, caplog):
    raw = MESSAGE.replace(b"alice@example.com", b"alice@other.example")
    with caplog.at_level(logging.INFO, logger="mailmoat"):
        assert run(world, raw)[1] == []
    assert "no key for other.example" in caplog.text


def test_a_rule_can_leave_mail_unsigned(world):
    extra = ("rules:\n  - name: lists\n    when: {recipient: [\"@lists.example\"]}\n"
             "    then: {sign: none}\n")
    envelope = Envelope(client_ip="10.1.2.3", mail_from="alice@example.com",
                        recipients=[Recipient("x@lists.example")])
    assert run(world, MESSAGE, envelope, extra)[1] == []


def test_streamed_body_and_whole_message_give_the_same_signature(world):
    policy = policy_for(world)
    head, body = MESSAGE.split(b"\r\n\r\n", 1)
    headers = [(line.split(b":", 1)[0].decode(), line.split(b":", 1)[1].decode())
               for line in head.split(b"\r\n")]
    signer = Signer(clock=lambda: NOW)
    pending = signer.start(policy, env(), headers, True)
    for i in range(len(body)):
        pending.body.feed(body[i:i + 1])
    streamed = signer.finish(pending, env()).edits
    _, whole = run(world, MESSAGE)
    # ed25519 signatures are deterministic; the RSA ones are too (PKCS#1 v1.5)
    assert [e.value for e in streamed] == [e.value for e in whole]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_readable_by_others_is_refused_at_its_line(world, mode):
    bad = _write(world["tmp"] / f"bad{mode:o}.key", world["rsa"], mode)
    text = f"sign:\n  keys:\n    - {{domain: example.com, selector: r1, file: \"{bad}\"}}\n"
    with pytest.raises(ConfigError) as caught:
        load_policy_text(text, EXTENSIONS, "p.yaml")
    assert f"p.yaml:3:7: sign.keys[0]: key file {bad} is readable" in str(caught.value)
    assert f"{mode:04o}" in str(caught.value)


def test_a_file_that_is_not_a_key_is_refused(world):
    junk = world["tmp"] / "junk.key"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    os.chmod(junk, 0o600)
    text = f"sign:\n  keys:\n    - {{domain: example.com, selector: r1, file: \"{junk}\"}}\n"
    with pytest.raises(ConfigError, match="holds no unencrypted PEM"):
        load_policy_text(text, EXTENSIONS, "p.yaml")


def test_two_rsa_keys_for_one_domain_are_refused(world):
    f = world["files"]["rsa"]
    text = (f"sign:\n  keys:\n    - {{domain: example.com, selector: a, file: \"{f}\"}}\n"
            f"    - {{domain: example.com, selector: b, file: \"{f}\"}}\n")
    with pytest.raises(ConfigError, match="two rsa-sha256 keys"):
        load_policy_text(text, EXTENSIONS, "p.yaml")


def test_a_table_entry_pointing_at_a_domain_without_keys_is_refused(world):
    with pytest.raises(ConfigError, match="which has no key"):
        load_policy_text("sign:\n  domains: {example.org: example.net}\n", EXTENSIONS)


def test_oversigning_a_field_not_signed_is_refused():
    with pytest.raises(ConfigError, match="oversign names fields not in headers"):
        load_policy_text("sign:\n  headers: [from]\n  oversign: [subject]\n", EXTENSIONS)


def test_a_header_name_with_a_colon_is_refused():
    with pytest.raises(ConfigError, match="not a header field name"):
        load_policy_text("sign:\n  headers: [from, 'x:y']\n", EXTENSIONS)


# -- ARC sealing wired in (arc_seal.py is the sign-arc helper's; here: which mail gets it) --
ARC = "  arc: {seal: SEAL, key: r1._domainkey.example.com}\n"


def inbound(marked: bool) -> bytes:
    from tests.unit.test_sign_arc import AUTHSERV_ID, auth_header
    assert AUTHSERV_ID == "mx.example.jp"
    mark = b"X-Mailmoat-Neutralized: links\r\n" if marked else b""
    return auth_header(None) + mark + MESSAGE.replace(b"alice@example.com", b"a@example.org")


def sealed_by(world: dict, raw: bytes, seal: str) -> tuple[bytes, list[AddHeader]]:
    policy = policy_for(world, ARC.replace("SEAL", seal))
    message = Message(raw=raw, envelope=env("192.0.2.9"))
    edits = Signer("mx.example.jp", clock=lambda: NOW).sign_message(policy, message).edits
    return on_top(edits, raw), edits


def test_inbound_mail_a_milter_changed_gets_an_arc_set_dkimpy_verifies(world):
    signed, edits = sealed_by(world, inbound(marked=True), "changed")
    assert [e.name for e in edits] == ["ARC-Authentication-Results", "ARC-Message-Signature",
                                       "ARC-Seal"]  # each inserted at the top: AS ends first
    assert signed.startswith(b"ARC-Seal:")
    cv, _, reason = dkim.arc_verify(signed, dnsfunc=lambda n, timeout=5: world["dns"].get(n))
    assert cv == b"pass", reason
    altered = signed.replace(b"Hello", b"Jello")
    assert dkim.arc_verify(altered, dnsfunc=lambda n, timeout=5: world["dns"].get(n))[0] == b"fail"


def test_unchanged_inbound_mail_is_sealed_only_with_seal_all(world):
    assert sealed_by(world, inbound(marked=False), "changed")[1] == []
    assert len(sealed_by(world, inbound(marked=False), "all")[1]) == 3
    assert sealed_by(world, inbound(marked=True), "none")[1] == []


def test_outbound_mail_is_signed_not_sealed(world):
    _, edits = run(world, MESSAGE, extra=ARC.replace("SEAL", "all"))
    assert [e.name for e in edits] == ["DKIM-Signature", "DKIM-Signature"]


def test_without_our_authentication_results_nothing_is_sealed_and_it_is_logged(world, caplog):
    raw = b"X-Mailmoat-Neutralized: links\r\n" + MESSAGE
    with caplog.at_level(logging.INFO, logger="mailmoat"):
        assert sealed_by(world, raw, "changed")[1] == []
    assert "seal_skipped" in caplog.text


@pytest.mark.parametrize("arc, problem", [
    ("{seal: changed}", "arc.key is required"),
    ("{seal: all, key: nosuch._domainkey.example.com}", "is not a key of keys"),
    ("{key: e1._domainkey.example.com}", "ARC verifiers know rsa-sha256 only"),
])
def test_an_arc_key_that_cannot_seal_is_refused(world, arc, problem):
    with pytest.raises(ConfigError, match=problem):
        policy_for(world, f"  arc: {arc}\n")


def test_policy_explain_says_which_key_signs_and_when_inbound_mail_is_sealed(world):
    from milters.sign.extension import explain
    policy = policy_for(world, ARC.replace("SEAL", "changed"))
    out = explain(policy, env())  # type: ignore[arg-type]
    assert out[0].startswith("sign: DKIM d=example.com with r1 (rsa-sha256) and e1 ")
    inbound = explain(policy, env(ip="198.51.100.7"))  # type: ignore[arg-type]
    assert inbound[0].startswith("sign: none")
    assert inbound[1] == ("  - ARC: sealed when a milter changed it (arc.seal: changed), "
                          "d=example.com s=r1")
    unsealed = explain(policy_for(world), env(ip="198.51.100.7"))  # type: ignore[arg-type]
    assert len(unsealed) == 1
