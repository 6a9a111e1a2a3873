"""What the ratelimit milter negotiates, as an MTA sees it on the wire (not Milter.testctx),
how it starts, reloads and stops."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from milters.core.milter_protocol import (ActionFlag, MacroStage, OptNeg, ProtocolFlag,
                                          negotiate)
from tests.harness.milter_proc import ROOT, MilterProcess, write_config
from tests.harness.ports import LOOPBACK, free_port, port_is_open

pytestmark = pytest.mark.integration
P = ProtocolFlag


def optneg(port: int, offer: OptNeg | None = None) -> OptNeg:
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        return negotiate(sock, offer)


@pytest.fixture
def milter(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = write_config(tmp_path, "ratelimit: {}\n")
    with MilterProcess("ratelimit", config, tmp_path) as proc:
        yield proc


def test_negotiates_only_the_steps_it_uses(milter: MilterProcess) -> None:
    reply = optneg(milter.port or 0)
    assert reply.version == 6
    # It edits nothing: the only action it asks for is to choose its macros.
    assert reply.actions == ActionFlag.SETSYMLIST
    # Skipped entirely: headers, end of headers, body, DATA, unknown commands.
    for flag in (P.NOHDRS, P.NOEOH, P.NOBODY, P.NODATA, P.NOUNKNOWN):
        assert flag in reply.protocol, flag
    # It decides at MAIL and RCPT, so the MTA must wait for those replies...
    for flag in (P.NOCONNECT, P.NOMAIL, P.NORCPT, P.NR_MAIL, P.NR_RCPT):
        assert flag not in reply.protocol, flag
    # ...but not at connect and HELO, which it only observes (a round trip saved each).
    assert P.NR_CONN in reply.protocol and P.NR_HELO in reply.protocol
    # Recipients the MTA rejected are a spam signal: it asks to see them.
    assert P.RCPT_REJ in reply.protocol
    assert reply.macros == {MacroStage.ENVFROM: ["i", "{auth_authen}"],
                            MacroStage.ENVRCPT: ["i", "{rcpt_mailer}"]}


def test_asks_only_for_what_the_mta_offers(milter: MilterProcess) -> None:
    """An MTA without RCPT_REJ or no-reply support (e.g. an old Sendmail) still works."""
    offer = OptNeg(6, ActionFlag(0x1FF), P.NOCONNECT | P.NOHELO | P.NOMAIL | P.NORCPT | P.NOBODY
                   | P.NOHDRS | P.NOEOH | P.NOUNKNOWN | P.NODATA)
    reply = optneg(milter.port or 0, offer)
    assert reply.protocol == P.NOBODY | P.NOHDRS | P.NOEOH | P.NOUNKNOWN | P.NODATA
    assert int(reply.protocol) & ~int(offer.protocol) == 0


STOCK_PYMILTER = textwrap.dedent("""
    import sys, Milter
    class Stock(Milter.Base):
        @Milter.symlist("{rcpt_mailer}")
        def envrcpt(self, to, *params):
            return Milter.CONTINUE
    Milter.factory = Stock
    Milter.runmilter("stock", "inet:%s@127.0.0.1" % sys.argv[1], 60)
""")


def test_stock_pymilter_symlist_bug_that_the_adapter_avoids(tmp_path: Path) -> None:
    """pymilter 1.0.5's own negotiate() with @symlist negotiates nothing away: no skips, no
    macro list. This is the bug DESIGN.md section 11 names; our adapter must not have it."""
    port = free_port()
    script = tmp_path / "stock.py"
    script.write_text(STOCK_PYMILTER)
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not port_is_open(LOOPBACK, port) and time.monotonic() < deadline:
            time.sleep(0.05)
        reply = optneg(port)
    finally:
        proc.kill()
        proc.wait(5)
    assert reply.macros == {}
    assert P.NOHDRS not in reply.protocol and P.NOBODY not in reply.protocol


def test_broken_policy_refuses_to_start_with_the_exact_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ratelimit:\n  limits:\n    - {name: a, rate: 5/min}\n")
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "mta.cli", "milter", "ratelimit", "--listen",
         f"inet:127.0.0.1:{port}", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    policy = tmp_path / "config-policy.yaml"
    assert result.stderr.strip() == (f"{policy}:3:7: ratelimit.limits[0]: missing required key "
                                     "'burst' (a whole number)")
    assert not port_is_open(LOOPBACK, port)


def test_reload_keeps_last_good_policy_and_applies_good_edits(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ratelimit: {}\n")
    policy = tmp_path / "config-policy.yaml"
    with MilterProcess("ratelimit", config, tmp_path) as proc:
        policy.write_text("ratelimit:\n  reply: 550 no\n")
        proc.wait_for_log(r"event=policy_reload_failed .*reason=\"file changed\"")
        proc.wait_for_log(rf"event=policy_problem detail=\"{policy}:2:10: "
                          r"ratelimit.reply: this reply must be temporary")
        policy.write_text("ratelimit:\n  allowlist: [192.0.2.0/24]\n")
        proc.wait_for_log(r"event=policy_reloaded .*reason=\"file changed\"")
        proc.signal(signal.SIGHUP)
        proc.wait_for_log(r"event=policy_reloaded .*reason=SIGHUP")
        # Still serving after all that.
        assert optneg(proc.port or 0).version == 6


def test_sigterm_stops_promptly_and_cleanly(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ratelimit: {}\n")
    proc = MilterProcess("ratelimit", config, tmp_path).start()
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 5
    assert "event=milter_stopped milter=ratelimit" in proc.log_text()


def test_unix_socket(tmp_path: Path) -> None:
    config = write_config(tmp_path, "ratelimit: {}\n")
    path = tmp_path / "ratelimit.sock"
    with MilterProcess("ratelimit", config, tmp_path, unix_path=path):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            assert negotiate(sock).version == 6


def test_embedded_defaults_need_no_config(tmp_path: Path) -> None:
    """What ./scripts/run does: no --config, SQLite state under ./var, the shipped policy."""
    with MilterProcess("ratelimit", None, tmp_path) as proc:
        assert optneg(proc.port or 0).version == 6
        assert (tmp_path / "var" / "state.db").exists()


def test_a_storm_of_signals_never_deadlocks_the_milter(tmp_path: Path) -> None:
    """Signal handlers used to set threading.Events: a SIGTERM arriving while the main
    thread held that Event's lock hung the milter for good (found as orphans after a
    killed serve sent SIGTERM through PR_SET_PDEATHSIG). Many at once must still stop it."""
    config = write_config(tmp_path, "ratelimit: {}\n")
    proc = MilterProcess("ratelimit", config, tmp_path).start()
    assert proc.proc is not None
    assert optneg(proc.port or 0).version == 6
    for _ in range(200):
        proc.signal(signal.SIGTERM)
    try:
        assert proc.proc.wait(timeout=20) == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
