"""The SMTP client deadlines in serve's config (gateway.smtpd_*): Postfix's defaults, the
admin's values reaching the SMTP server's settings, and what a wrong value says."""
from __future__ import annotations

from pathlib import Path

import pytest

from milters.core.config import SmtpdLimits, load_config
from milters.core.errors import ConfigError
from mta.smtp_in.server import SmtpSettings, smtpd_limits


def test_the_defaults_are_postfixs() -> None:
    limits = load_config(None).smtpd
    assert limits == SmtpdLimits(timeout=300.0, stress_timeout=10.0, min_data_rate=500,
                                 stress_share=0.8)


def test_the_admins_values_reach_the_smtp_server(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("gateway:\n  smtpd_timeout: 2m\n  smtpd_stress_timeout: 5s\n"
                    "  smtpd_min_data_rate: 2000\n  smtpd_stress_share: 0.5\n")
    settings = SmtpSettings(hostname="mx", internal_networks=(),
                            **smtpd_limits(load_config(path).smtpd))
    assert (settings.timeout, settings.stress_timeout, settings.min_data_rate,
            settings.stress_share) == (120.0, 5.0, 2000.0, 0.5)


@pytest.mark.parametrize("line, problem", [
    ("smtpd_timeout: 0s", "smtpd_timeout"),
    ("smtpd_stress_timeout: soon", "smtpd_stress_timeout"),
    ("smtpd_min_data_rate: 0", "smtpd_min_data_rate"),
    ("smtpd_stress_share: 1.5", "smtpd_stress_share"),
    ("smtpd_timeuot: 10s", "smtpd_timeuot"),
])
def test_a_wrong_value_names_file_line_and_key(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"gateway:\n  {line}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert f"{path}:2:" in message and f"gateway.{problem}" in message, message
