"""gateway.relay: a route is a target string, or a mapping with its outbound TLS level
(none, may, encrypt, verify) and CA file; route domains are kept as A-labels. Every mistake
is an error at FILE:LINE:COL, never a setting accepted and ignored."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from milters.core.config import GatewayConfig, RelayTarget, load_config
from milters.core.errors import ConfigError
from mta.delivery.maildir import MaildirDelivery
from mta.delivery.relay import SmtpRelay
from mta.delivery.routing import build_router


def load(tmp_path: Path, relay: str) -> GatewayConfig:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"gateway:\n  relay:\n{relay}")
    return load_config(path)


def problems(tmp_path: Path, relay: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, relay)
    return str(raised.value)


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=ca",
                    "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.pem")],
                   check=True, capture_output=True, timeout=30)
    return tmp_path / "ca.pem"


def test_the_string_form_still_works_and_means_may(tmp_path: Path) -> None:
    config = load(tmp_path, '    default: "smtp:[mail.internal.example.jp]:25"\n'
                            '    routes: {archive.example.jp: "maildir:archive"}\n')
    assert config.relay_default == RelayTarget("smtp:[mail.internal.example.jp]:25", "may")
    assert config.relay_routes == {
        "archive.example.jp": RelayTarget(f"maildir:{tmp_path / 'archive'}")}
    router = build_router(config)
    assert isinstance(router.default, SmtpRelay) and router.default.tls.level == "may"
    assert isinstance(router.routes["archive.example.jp"], MaildirDelivery)


def test_a_route_mapping_sets_its_tls_level_and_ca_file(tmp_path: Path, ca_file: Path) -> None:
    config = load(tmp_path, '    default: {target: "smtp:[mx.example.jp]:25", tls: encrypt}\n'
                            '    routes:\n'
                            '      partner.example: {target: "smtp:[mx.partner.example]:25",\n'
                            '                        tls: verify, ca_file: ca.pem}\n'
                            '      old.example: {target: "smtp:[mx.old.example]:25", tls: none}\n')
    assert config.relay_default.tls == "encrypt"
    assert config.relay_routes["partner.example"] == RelayTarget(
        "smtp:[mx.partner.example]:25", "verify", ca_file)
    router = build_router(config)
    partner = router.routes["partner.example"]
    assert isinstance(partner, SmtpRelay)
    assert (partner.host, partner.tls.level, partner.tls.ca_file) == (
        "mx.partner.example", "verify", ca_file)
    assert partner.tls.context.check_hostname  # verify checks the name...
    none = router.routes["old.example"]
    assert isinstance(none, SmtpRelay) and none.tls.level == "none"


def test_route_domains_are_kept_as_a_labels(tmp_path: Path) -> None:
    config = load(tmp_path, '    routes: {"例え.JP.": "smtp:[mx.example.jp]:25"}\n')
    assert list(config.relay_routes) == ["xn--r8jz45g.jp"]


@pytest.mark.parametrize("relay, where, says", [
    ('    default: {target: "smtp:[mx]:25", tls: verfy}\n', ":3:", "did you mean 'verify'"),
    ('    default: {target: "smtp:[mx]:25", tsl: verify}\n', ":3:", "unknown key"),
    ('    default: {tls: verify}\n', ":3:", "missing required key 'target'"),
    ('    default: {target: "maildir:m", tls: encrypt}\n', ":3:", "smtp: targets only"),
    ('    default: {target: "smtp:[mx]:25", tls: may, ca_file: ca.pem}\n', ":3:",
     "ca_file is used only with tls: verify"),
    ('    default: {target: "smtp:[mx]:25", tls: verify, ca_file: missing.pem}\n', ":3:",
     "cannot load CA certificates"),
    ('    routes:\n      x.example: {target: "smtp:[mx]:25",\n        tls: sometimes}\n',
     ":5:", "must be one of none, may, encrypt, verify"),
    ('    routes: {"ｅxample..jp": "smtp:[mx]:25"}\n', ":3:", "not a valid domain name"),
    ('    default: "lmtp:[mx]:24"\n', ":3:", "smtp:[host]:port or maildir:"),
])
def test_every_mistake_is_an_error_at_its_place(tmp_path: Path, ca_file: Path, relay: str,
                                                where: str, says: str) -> None:
    message = problems(tmp_path, relay)
    assert f"{tmp_path / 'gateway.yaml'}{where}" in message and says in message, message


def test_a_ca_file_that_is_not_pem_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    message = problems(tmp_path, '    default: {target: "smtp:[mx]:25", tls: verify, '
                                 'ca_file: junk.pem}\n')
    assert "cannot load CA certificates" in message and "gateway.yaml:3:" in message
