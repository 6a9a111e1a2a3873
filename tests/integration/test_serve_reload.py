"""SIGHUP to `serve` (systemd's ExecReload=kill -HUP $MAINPID) reloads the policy without a
restart: serve's own part (internal_networks: who may relay) for the next connections, and
each milter's, passed on to the milter processes. A broken edit keeps the last good policy."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.integration.test_serve import POLICY, Serve, outside

pytestmark = pytest.mark.integration

INTERNAL = "internal_networks: [127.0.0.0/8, 192.0.2.0/24]\n"


def _relay(serve: Serve, client: str) -> list[str]:
    return outside(serve.port, rcpt="partner@elsewhere.example", client=client).replies("RCPT")


def test_sighup_reloads_the_policy_of_serve_and_of_its_milters(tmp_path: Path) -> None:
    serve = Serve(tmp_path).start()
    try:
        assert serve.proc is not None
        milter = int(serve.wait_log(r"event=milter_process_started milter=ratelimit "
                                    r"pid=(\d+)").group(1))
        denied = _relay(serve, "192.0.2.50")
        assert denied == ["554 5.7.1 <partner@elsewhere.example>: Relay access denied"]
        (tmp_path / "policy.yaml").write_text(POLICY + INTERNAL)
        serve.proc.send_signal(signal.SIGHUP)
        serve.wait_log(rf"mailmoat/serve\[{serve.proc.pid}\]: event=policy_reloaded "
                       r".*reason=SIGHUP")
        serve.wait_log(rf"mailmoat/ratelimit\[{milter}\]: event=policy_reloaded .*reason=SIGHUP")
        assert serve.proc.poll() is None  # reloaded, not killed
        assert _relay(serve, "192.0.2.51") == ["250 2.1.5 Ok"]
        assert serve.text().count("event=milter_process_started") == 1  # nothing restarted
    finally:
        serve.stop()


def test_a_broken_edit_and_a_sighup_keep_the_last_good_policy(tmp_path: Path) -> None:
    serve = Serve(tmp_path, policy=POLICY + INTERNAL).start()
    try:
        assert serve.proc is not None
        assert _relay(serve, "192.0.2.60") == ["250 2.1.5 Ok"]
        (tmp_path / "policy.yaml").write_text(POLICY + "internal_networks: [192.0.2.0/33]\n")
        serve.proc.send_signal(signal.SIGHUP)
        serve.wait_log(rf"mailmoat/serve\[{serve.proc.pid}\]: event=policy_reload_failed "
                       r".*action=\"keeping the last good policy\"")
        serve.wait_log(r"event=policy_problem detail=.*internal_networks")
        assert serve.proc.poll() is None
        assert _relay(serve, "192.0.2.61") == ["250 2.1.5 Ok"]
    finally:
        serve.stop()
