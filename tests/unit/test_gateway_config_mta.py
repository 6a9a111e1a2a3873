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


def test_milter_timeouts_default_like_postfix_and_are_set_per_milter(tmp_path: Path) -> None:
    from mta.gateway.serve import MilterSupervisor
    path = tmp_path / "gateway.yaml"
    path.write_text("milters:\n  - {name: ratelimit, command_timeout: 2s}\n"
                    "  - {name: neutralize, connect_timeout: 500ms, content_timeout: 15m}\n")
    config = load_config(path)
    ratelimit, neutralize = (MilterSupervisor(config, str(path)).members())
    # Postfix's milter_command_timeout and milter_content_timeout; connect is 5s (see config).
    assert (ratelimit.endpoint.connect_timeout, ratelimit.endpoint.command_timeout,
            ratelimit.endpoint.content_timeout) == (5.0, 2.0, 300.0)
    assert (neutralize.endpoint.connect_timeout, neutralize.endpoint.command_timeout,
            neutralize.endpoint.content_timeout) == (0.5, 30.0, 900.0)


@pytest.mark.parametrize("value, problem", [("0s", "at least 0.1"), ("soon", "duration")])
def test_a_wrong_milter_timeout_names_file_line_and_key(tmp_path: Path, value: str,
                                                        problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        milters_of(tmp_path, f"milters:\n  - name: ratelimit\n    command_timeout: {value}\n")
    message = str(raised.value)
    assert f"{tmp_path / 'gateway.yaml'}:3" in message
    assert "milters[0].command_timeout" in message or "command_timeout" in message
    assert problem in message


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("30s", 30), ("5m", 300),
                                           ("5 mins", 300), ("2 hours", 7200), ("10", 10)])
def test_durations_read_the_whole_unit(text: str, seconds: float) -> None:
    """'500ms' was once read as 500 minutes (the 's' taken for a plural)."""
    from milters.core.policy.schema import parse_duration
    assert parse_duration(text) == seconds
