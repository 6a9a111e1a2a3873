"""The console as a process: `mailmoat console` alone (plain and HTTPS), and started,
restarted and stopped by `mailmoat serve` when a `console:` block is configured."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from mta.console.security import CSP
from tests.harness.certs import TestCa
from tests.harness.milter_proc import ROOT
from tests.harness.ports import free_port
from tests.integration.test_serve import RUN_AS, Serve

pytestmark = pytest.mark.integration
WAIT = 20.0
# As serve's tests do: root in CI stays root (the drop itself is tested in test_privileges).
USER = f"gateway: {{user: {RUN_AS}}}\n"


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path,
                 verify: bool | ssl.SSLContext = True) -> httpx.Response:
    deadline = time.monotonic() + WAIT
    while True:
        assert proc.poll() is None, f"the console exited:\n{log.read_text()}"
        try:
            return httpx.get(url + "/healthz", verify=verify, timeout=2)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"no /healthz:\n{log.read_text()}"
            time.sleep(0.05)


def console_cmd(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "mta.cli", "console", "--config",
                                 str(config)], cwd=ROOT, stdout=out, stderr=out,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def stop_all() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(WAIT)


def test_mailmoat_console_serves_plain_http_on_loopback(
        tmp_path: Path, stop_all: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"{USER}store: sqlite:///state.db\n"
                      f"console: {{listen: '127.0.0.1:{port}'}}\n")
    log = tmp_path / "console.log"
    proc = console_cmd(config, log)
    stop_all.append(proc)
    base = f"http://127.0.0.1:{port}"
    health = wait_healthy(base, proc, log)
    assert health.text == "ok\n" and health.headers["content-security-policy"] == CSP
    page = httpx.get(base + "/login", headers={"accept-language": "ja"}, timeout=5)
    assert page.status_code == 200 and "ログイン" in page.text
    assert "uvicorn" not in page.headers.get("server", "")
    cookie = page.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    key = tmp_path / "var" / "console-secret"
    assert key.stat().st_mode & 0o777 == 0o600
    # A form posted without its token: refused, and the log says so.
    refused = httpx.post(base + "/login", data={"name": "a", "password": "b"}, timeout=5)
    assert refused.status_code == 403
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0
    text = log.read_text()
    assert "event=console_started" in text and "loop=uvloop" in text
    assert "event=console_csrf_refused" in text and "event=console_stopped" in text
    assert "Traceback" not in text


def test_mailmoat_console_serves_https_with_its_certificate(
        tmp_path: Path, stop_all: list[subprocess.Popen[bytes]]) -> None:
    ca = TestCa(tmp_path)
    cert, key = ca.issue("console", "IP:127.0.0.1")
    key.chmod(0o600)
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"{USER}store: memory://\nconsole:\n  listen: '127.0.0.1:{port}'\n"
                      f"  tls: {{cert: {cert}, key: {key}}}\n")
    log = tmp_path / "console.log"
    proc = console_cmd(config, log)
    stop_all.append(proc)
    base = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(ca.cert))
    wait_healthy(base, proc, log, verify=trust)
    page = httpx.get(base + "/login", verify=trust, timeout=5)
    assert "Secure" in page.headers["set-cookie"]
    assert page.headers["strict-transport-security"].startswith("max-age=")
    with pytest.raises(httpx.TransportError):  # plain HTTP on the HTTPS port gets nothing
        httpx.get(f"http://127.0.0.1:{port}/login", timeout=5).raise_for_status()


def served_certificate(port: int, trust: ssl.SSLContext) -> str:
    """The serial number of the certificate a new TLS handshake gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with trust.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert()["serialNumber"]  # type: ignore[index,return-value]


def test_sighup_loads_a_renewed_certificate_and_keeps_the_old_on_a_broken_one(
        tmp_path: Path, stop_all: list[subprocess.Popen[bytes]]) -> None:
    """systemctl reload after a renewal: new handshakes get the new certificate, with no
    restart (sessions live in the process). A pair half written when the signal comes is
    refused and the certificate in use stays."""
    ca = TestCa(tmp_path)
    cert, key = ca.issue("console", "IP:127.0.0.1")
    key.chmod(0o600)
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"{USER}store: memory://\nconsole:\n  listen: '127.0.0.1:{port}'\n"
                      f"  tls: {{cert: {cert}, key: {key}}}\n")
    log = tmp_path / "console.log"
    proc = console_cmd(config, log)
    stop_all.append(proc)
    trust = ssl.create_default_context(cafile=str(ca.cert))
    wait_healthy(f"https://127.0.0.1:{port}", proc, log, verify=trust)
    first = served_certificate(port, trust)

    renewed, renewed_key = ca.issue("console-renewed", "IP:127.0.0.1")
    shutil.copyfile(renewed, cert)
    shutil.copyfile(renewed_key, key)
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    while "event=console_reloaded" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    second = served_certificate(port, trust)
    assert second != first

    cert.write_text("-----BEGIN CERTIFICATE-----\nhalf a renewal\n")
    proc.send_signal(signal.SIGHUP)
    while "event=console_reload_failed" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    assert served_certificate(port, trust) == second
    assert proc.poll() is None and "Traceback" not in log.read_text()


def test_a_real_account_logs_in_and_the_sixth_failure_is_throttled(
        tmp_path: Path, stop_all: list[subprocess.Popen[bytes]]) -> None:
    """The real login (mta/console/login.py) behind the page: an account made with
    `mailmoat user add --role`, a wrong password, the right one, logout; then failures from
    the same address until the 6th attempt in the minute is refused, right password or not."""
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"{USER}store: sqlite:///state.db\n"
                      f"console: {{listen: '127.0.0.1:{port}'}}\n")
    added = subprocess.run([sys.executable, "-m", "mta.cli", "user", "add", "alice", "--role",
                            "admin", "--config", str(config)], input="Alice-Pass-2026\n",
                           cwd=ROOT, capture_output=True, text=True, timeout=WAIT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert added.returncode == 0, added.stderr
    log = tmp_path / "console.log"
    proc = console_cmd(config, log)
    stop_all.append(proc)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc, log)

    def attempt(client: httpx.Client, name: str, password: str) -> httpx.Response:
        page = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token, page.text
        return client.post("/login", data={"csrf_token": token.group(1), "name": name,
                                           "password": password})

    with httpx.Client(base_url=base, timeout=10) as client:
        wrong = attempt(client, "alice", "Alice-Pass-2025")
        assert wrong.status_code == 401 and "Wrong user name or password." in wrong.text
        right = attempt(client, "alice", "Alice-Pass-2026")
        assert right.status_code == 303 and right.headers["location"] == "/held"
        me = client.get("/api/me").json()
        assert (me["name"], me["role"]) == ("alice", "admin")
        assert client.post("/api/logout", headers={"x-csrf-token": me["csrf_token"]}
                           ).status_code == 200
        for _ in range(4):  # failures 2 to 5 from this address
            assert attempt(client, "nobody", "guess").status_code == 401
        sixth = attempt(client, "alice", "Alice-Pass-2026")
        assert sixth.status_code == 429 and int(sixth.headers["retry-after"]) > 0
        assert client.get("/api/me").status_code == 401
    text = log.read_text()
    assert "event=console_login name=alice" in text and "event=console_logout name=alice" in text
    assert "event=console_login_throttled" in text
    assert "Alice-Pass" not in text and "Traceback" not in text
    # The same in the audit log, with who and from where (written at the console's exit).
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0
    shown = subprocess.run([sys.executable, "-m", "mta.cli", "audit", "search", "--event",
                            "console_login", "--event", "console_login_failed", "--event",
                            "console_logout", "--event", "console_login_throttled",
                            "--config", str(config)], cwd=ROOT, capture_output=True,
                           text=True, timeout=WAIT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any("console_login " in line and "console:alice" in line and "127.0.0.1" in line
               for line in lines), shown.stdout
    assert any("console_logout" in line and "console:alice" in line for line in lines)
    assert sum("console_login_failed" in line for line in lines) >= 5, shown.stdout
    assert any("console_login_throttled" in line for line in lines), shown.stdout
    assert "Alice-Pass" not in shown.stdout
    verified = subprocess.run([sys.executable, "-m", "mta.cli", "audit", "verify", "--config",
                               str(config)], cwd=ROOT, capture_output=True, text=True,
                              timeout=WAIT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert verified.returncode == 0 and "chain intact" in verified.stdout, verified.stdout


@pytest.mark.parametrize("text, expected", [
    ("console: {listen: '0.0.0.0:8026'}\n",
     r"gateway.yaml:2:10: console: listen is not a loopback address; set console.tls"),
    ("console: {tls: {cert: nothing.pem, key: nothing.key}}\n",
     r"console.tls: cannot load .*nothing.pem"),
    ("store: memory://\n", r"no console: block"),
])
def test_mailmoat_console_refuses_what_cannot_work_with_one_clear_line(
        tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(USER + text)
    done = subprocess.run([sys.executable, "-m", "mta.cli", "console", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=WAIT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and re.search(expected, done.stderr), done.stderr
    assert "Traceback" not in done.stderr


def test_a_taken_console_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "gateway.yaml"
        config.write_text(f"{USER}store: memory://\n"
                          f"console: {{listen: '127.0.0.1:{port}'}}\n")
        done = subprocess.run([sys.executable, "-m", "mta.cli", "console", "--config",
                               str(config)], cwd=ROOT, capture_output=True, text=True,
                              timeout=WAIT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port} (console.listen): Address already in use" \
        in done.stderr and "Traceback" not in done.stderr


def test_serve_starts_restarts_and_stops_the_console(tmp_path: Path) -> None:
    port = free_port()
    gateway = Serve(tmp_path)
    gateway.config.write_text(gateway.config.read_text()
                              + f"console: {{listen: '127.0.0.1:{port}'}}\n")
    gateway.start()
    try:
        base = f"http://127.0.0.1:{port}"
        first = int(gateway.wait_log(r"event=console_process_started pid=(\d+)").group(1))
        assert gateway.proc is not None
        assert wait_healthy(base, gateway.proc, gateway.log).text == "ok\n"
        os.kill(first, signal.SIGKILL)
        again = gateway.wait_log(r"(?s)event=console_process_died [^\n]*status=-9 "
                                 r"action=restarting.*event=console_process_started pid=(\d+)")
        assert int(again.group(1)) != first
        assert wait_healthy(base, gateway.proc, gateway.log).status_code == 200
    finally:
        assert gateway.stop() == 0
    text = gateway.text()
    assert "event=console_process_stopped" in text and text.count("event=console_stopped") >= 1
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert "Traceback" not in text


def test_serve_without_a_console_block_starts_none(serve: Serve) -> None:
    assert "console_process_started" not in serve.text()


from tests.integration.test_serve import serve  # noqa: E402,F401 (the fixture)
