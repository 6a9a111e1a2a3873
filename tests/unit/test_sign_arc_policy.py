"""The `sign.arc` settings and which mail gets an ARC set (milters/sign/arc_policy.py)."""
from __future__ import annotations

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from milters.core.policy.yamlnodes import Problems
from milters.sign.arc_policy import ARC_SPEC, ArcChoice, ArcSettings, resolve, wants_seal
from milters.sign.dkim_sign import SigningKey

RSA = SigningKey("example.jp", "arc2026", "rsa-sha256",
                 rsa.generate_private_key(public_exponent=65537, key_size=2048))
ED = SigningKey("example.jp", "ed2026", "ed25519-sha256", ed25519.Ed25519PrivateKey.generate())
OTHER = SigningKey("example.net", "arc2026", "rsa-sha256", RSA.private)
KEYS = (ED, OTHER, RSA)
PLAIN = [(b"From", b" a@example.org"), (b"Subject", b" hello")]
MARKED = PLAIN + [(b"X-Mailmoat-Neutralized", b" links=1; rule=suspicious")]


def read(text: str) -> tuple[object, list[str]]:
    problems = Problems("policy.yaml")
    value = ARC_SPEC.read(yaml.compose(text), "sign.arc", problems)
    return value, problems.lines


def test_the_section_reads_with_changed_as_the_default() -> None:
    assert read("key: arc2026._domainkey.example.jp\n") == (
        ArcChoice("changed", "arc2026._domainkey.example.jp"), [])


@pytest.mark.parametrize("text, problem", [
    ("seal: sometimes\nkey: a._domainkey.b\n", "sign.arc.seal: must be one of changed, all, none (got sometimes)"),
    ("seal: all\nkeys: a._domainkey.b\n", "did you mean 'key'"),
])
def test_a_bad_section_is_a_policy_error_at_its_line(text: str, problem: str) -> None:
    _, lines = read(text)
    assert lines and problem in lines[0] and lines[0].startswith("policy.yaml:"), lines


def test_the_key_is_found_by_its_dns_name_among_same_selectors() -> None:
    arc = resolve(ArcChoice("all", "ARC2026._domainkey.Example.JP."), KEYS)
    assert arc == ArcSettings("all", RSA)


@pytest.mark.parametrize("choice, problem", [
    (ArcChoice("changed", ""), "arc.key is missing"),
    (ArcChoice("all", "arc2026._domainkey.example.org"), "names no key of sign.keys"),
    (ArcChoice("all", "arc2026.example.jp"), "names no key of sign.keys"),
    (ArcChoice("all", "ed2026._domainkey.example.jp"), "rsa-sha256 only"),
    (ArcChoice("none", "arc2026._domainkey.example.jp"), "arc.seal is none"),
])
def test_a_key_that_cannot_seal_is_refused_with_the_fix(choice: ArcChoice, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        resolve(choice, KEYS)


def test_which_mail_is_sealed() -> None:
    changed, every = ArcSettings("changed", RSA), ArcSettings("all", RSA)
    assert wants_seal(changed, True, MARKED) == ""
    assert "unchanged" in wants_seal(changed, True, PLAIN)
    assert wants_seal(every, True, PLAIN) == ""
    assert "outbound" in wants_seal(every, False, MARKED)
    assert "none" in wants_seal(ArcSettings(), True, MARKED)
