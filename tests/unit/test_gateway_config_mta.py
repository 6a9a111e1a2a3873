"""serve's config where it decides how the MTA runs: whose milter connections are kept
between SMTP sessions (reuse_connection), the delivery process's priority, and what a wrong
value says."""
from __future__ import annotations

from pathlib import Path

import pytest

from milters.core.config import load_config
from milters.core.errors import ConfigError


def milters_of(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return load_config(path).milters


def test_reuse_is_on_for_our_milters_and_off_for_external_ones_by_default(tmp_path: Path
                                                                          ) -> None:
    ours, external = milters_of(tmp_path, "milters:\n  - {name: ratelimit}\n"
                                          "  - {name: opendkim, socket: 'inet:127.0.0.1:8891'}\n")
    assert ours.reuses_connection is True
    assert external.reuses_connection is False


def test_the_admin_can_say_otherwise_both_ways(tmp_path: Path) -> None:
    ours, external = milters_of(
        tmp_path, "milters:\n  - {name: ratelimit, reuse_connection: false}\n"
                  "  - {name: opendkim, socket: 'inet:127.0.0.1:8891', reuse_connection: true}\n")
    assert ours.reuses_connection is False
    assert external.reuses_connection is True


def test_a_wrong_value_names_file_line_and_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        milters_of(tmp_path, "milters:\n  - name: ratelimit\n    reuse_connection: sometimes\n")
    message = str(raised.value)
    assert f"{tmp_path / 'gateway.yaml'}:3" in message
    assert "true or false" in message


def test_delivery_nice_defaults_to_5_and_stays_within_0_to_19(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("gateway: {hostname: mx.example.jp}\n")
    assert load_config(path).queue.delivery_nice == 5
    path.write_text("gateway:\n  queue: {delivery_nice: 0}\n")
    assert load_config(path).queue.delivery_nice == 0
    path.write_text("gateway:\n  queue: {delivery_nice: 25}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert f"{path}:2" in str(raised.value)
