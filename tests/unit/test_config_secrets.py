"""Secrets never sit in a config file: a password written into one (a Redis URL, the Nextcloud
app password, a partner's ZIP password, anything called `password`) is refused with its
position and the env/file keys to use instead, and never echoed; the env/file alternatives
really work (a Redis with requirepass), and a secret file every user can read is refused."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from milters.core.config import load_config
from milters.core.errors import ConfigError, StoreError
from milters.core.policy.document import load_policy_text
from milters.core.store import open_gateway_store
from mta.cli import EXTENSIONS
from tests.conftest import ROOT
from tests.harness.redis_server import RedisServer

SECRET = "Hunter2-s3cret"


def config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return "\n".join(info.value.problems)


@pytest.mark.parametrize("url", [
    f"redis://:{SECRET}@127.0.0.1/0",
    f"redis://mailmoat:{SECRET}@127.0.0.1:6379/0",
    f"rediss://:{SECRET}@redis.example.jp:6380/1",
    f"redis://127.0.0.1/0?password={SECRET}",
])
def test_a_redis_password_in_the_store_url_is_refused_and_never_echoed(
        tmp_path: Path, url: str) -> None:
    problems = config_error(tmp_path, f"gateway: {{hostname: mx.example.jp}}\nstore: {url}\n")
    assert problems.startswith(f"{tmp_path / 'gateway.yaml'}:2:8: store: ")
    assert SECRET not in problems
    assert "***" in problems  # the URL is shown masked, so the admin sees which one
    assert "store_password_env" in problems and "store_password_file" in problems


def test_the_command_line_refuses_the_url_without_printing_the_password(tmp_path: Path) -> None:
    """The command line a mail admin runs: exit 1, the position, no secret on any stream."""
    config = tmp_path / "gateway.yaml"
    config.write_text(f"store: redis://:{SECRET}@127.0.0.1/0\n")
    done = subprocess.run([sys.executable, "-m", "mta.cli", "scan", "--config", str(config),
                           str(ROOT / "samples" / "ppap-attachment-ja.eml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode != 0
    assert f"{config}:1:8: store: the Redis URL holds a password" in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_a_redis_user_name_alone_is_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("store: redis://mailmoat@127.0.0.1/0\nstore_password_env: X\n")
    assert load_config(path).store == "redis://mailmoat@127.0.0.1/0"


def test_a_store_password_for_a_store_without_one_is_an_error(tmp_path: Path) -> None:
    problems = config_error(tmp_path, "store: sqlite:///state.db\nstore_password_env: X\n")
    assert "for a redis:// store only" in problems
    problems = config_error(tmp_path, "store: redis://127.0.0.1/0\nstore_password_env: X\n"
                                      "store_password_file: /x\n")
    assert "not both" in problems


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_a_password_protected_redis_works_from_a_file_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILMOAT_REDIS_PASSWORD", raising=False)
    with RedisServer(extra_args=("--requirepass", SECRET)) as server:
        config = tmp_path / "gateway.yaml"
        config.write_text(f"store: {server.url}\n")
        with pytest.raises(StoreError) as refused:  # no password: Redis says NOAUTH
            with open_gateway_store(load_config(config)) as store:
                store.ping()
        assert SECRET not in str(refused.value)

        private_file(tmp_path / "redis.pass", SECRET)
        config.write_text(f"store: {server.url}\nstore_password_file: redis.pass\n")
        with open_gateway_store(load_config(config)) as store:
            store.ping()

        monkeypatch.setenv("MM_TEST_REDIS_PW", SECRET)
        config.write_text(f"store: {server.url}\nstore_password_env: MM_TEST_REDIS_PW\n")
        with open_gateway_store(load_config(config)) as store:
            store.ping()
        monkeypatch.delenv("MM_TEST_REDIS_PW")
        with pytest.raises(ConfigError, match="MM_TEST_REDIS_PW"):  # named, but not set
            open_gateway_store(load_config(config))


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o666])
def test_a_redis_password_file_every_user_can_read_is_refused(tmp_path: Path,
                                                              mode: int) -> None:
    private_file(tmp_path / "redis.pass", SECRET, mode)
    config = tmp_path / "gateway.yaml"
    config.write_text("store: redis://127.0.0.1:1/0\nstore_password_file: redis.pass\n")
    with pytest.raises(ConfigError) as info:
        open_gateway_store(load_config(config))
    [problem] = info.value.problems
    assert "readable by every user" in problem and "chmod o-rwx" in problem
    assert SECRET not in problem


@pytest.mark.parametrize(("section", "named"), [
    ("attachments: {offload: {nextcloud: {url: 'https://cloud.example.jp', user: u, "
     f"password: {SECRET}}}}}}}\n", "password_env or password_file"),
    ("attachments: {encrypt: {password: {fixed: [{recipients: ['@partner.example'], "
     f"password: {SECRET}}}]}}}}}}\n", "password_env or password_file"),
    (f"ratelimit: {{secret: {SECRET}}}\n", "an environment variable or a file"),
])
def test_a_password_in_a_policy_is_refused_with_the_alternatives(section: str,
                                                                 named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy_text(section, EXTENSIONS, source="p.yaml")
    [problem] = info.value.problems
    assert problem.startswith("p.yaml:1:") and "never write a secret into the config" in problem
    assert named in problem and SECRET not in problem


def test_an_smtp_auth_password_in_the_gateway_config_is_refused(tmp_path: Path) -> None:
    problems = config_error(tmp_path, f"gateway:\n  auth: {{users_file: u, password: {SECRET}}}\n")
    assert ":2:" in problems and "users_file" in problems and SECRET not in problems


def test_a_fixed_password_needs_exactly_one_source() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        load_policy_text("attachments: {encrypt: {password: {fixed: [{recipients: "
                         "['@partner.example']}]}}}\n", EXTENSIONS)


def test_internal_domains_is_refused_with_what_to_write_instead() -> None:
    """A sender domain is forged at will: the key that suggested it makes mail internal is
    refused at its position, never accepted and ignored."""
    with pytest.raises(ConfigError) as info:
        load_policy_text("internal_networks: [10.0.0.0/8]\ninternal_domains: [example.jp]\n",
                         EXTENSIONS, source="p.yaml")
    [problem] = info.value.problems
    assert problem.startswith("p.yaml:2:1: internal_domains: internal_domains is not a setting")
    assert "internal_networks and SMTP AUTH" in problem and 'recipient: ["@example.jp"]' in problem
