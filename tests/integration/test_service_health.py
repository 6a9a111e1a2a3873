"""/healthz, /readyz and mailmoat_build_info on serve's metrics listener, as a load balancer
or an orchestrator reads them: each readiness condition is broken for real (the spool's
tmp/ made unusable, a milter killed or frozen, redis-server stopped) and /readyz must turn
503 with the reason, then 200 again once it is mended."""
from __future__ import annotations

import http.client
import os
import re
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from mta import __version__
from tests.harness.milter_proc import MilterProcess
from tests.harness.ports import free_port
from tests.harness.redis_server import RedisServer
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


def wait_ready(port: int, want: int, timeout: float = 30.0) -> str:
    """The body once /readyz answers `want` (the supervisor restarts things meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(port, "/readyz")
        if status == want:
            return body
        assert time.monotonic() < deadline, f"/readyz stayed {status}: {body}"
        time.sleep(0.2)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Serve]:
    serve = Serve(tmp_path, milters="milters: [{name: ratelimit, connect_timeout: 1s}]\n")
    serve.start()
    try:
        yield serve
    finally:
        serve.stop()


def test_healthz_readyz_and_build_info_answer_on_the_metrics_port(gateway: Serve) -> None:
    assert get(gateway.metrics, "/healthz") == (200, "ok\n")
    assert get(gateway.metrics, "/readyz") == (200, "ready\n")
    assert get(gateway.metrics, "/readyz?verbose=1")[0] == 200
    status, page = get(gateway.metrics, "/metrics")
    assert status == 200
    [info] = [line for line in page.splitlines() if line.startswith("mailmoat_build_info{")]
    assert re.fullmatch(r'mailmoat_build_info\{python="3\.\d+\.\d+",version="([^"]+)"\} 1',
                        info).group(1) == __version__


def test_an_unusable_spool_makes_readyz_503_with_the_reason(gateway: Serve) -> None:
    tmp = gateway.dir / "var" / "spool" / "tmp"
    if not tmp.exists():  # the spool is where the config puts it
        [tmp] = list(gateway.dir.rglob("spool/tmp"))
    aside = tmp.with_name("tmp.aside")
    # Root ignores modes: a file where tmp/ should be breaks the queue for root too.
    tmp.rename(aside)
    tmp.write_text("not a directory")
    try:
        body = wait_ready(gateway.metrics, 503)
        assert re.fullmatch(rf"queue: cannot write in {re.escape(str(tmp))}: Not a directory\n",
                            body), body
        assert get(gateway.metrics, "/healthz")[0] == 200  # up, only not ready
    finally:
        tmp.unlink()
        aside.rename(tmp)
    wait_ready(gateway.metrics, 200)


def test_a_frozen_milter_makes_readyz_503_until_it_answers_again(gateway: Serve) -> None:
    pid = int(gateway.wait_log(r"event=milter_process_started milter=ratelimit pid=(\d+)")
              .group(1))
    os.kill(pid, signal.SIGSTOP)  # alive to the supervisor, deaf to OPTNEG
    try:
        body = wait_ready(gateway.metrics, 503)
        assert re.fullmatch(r"milter ratelimit: not answering \(unix:\S+/ratelimit\.sock: "
                            r"no reply within 1s\)\n", body), body
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_ready(gateway.metrics, 200)


def test_a_killed_external_milter_makes_readyz_503(tmp_path: Path) -> None:
    port = free_port()
    serve = Serve(tmp_path, milters=(
        "milters:\n  - {name: ratelimit}\n"
        f"  - {{name: outside, socket: 'inet:127.0.0.1:{port}', connect_timeout: 1s}}\n"))
    external = MilterProcess("ratelimit", serve.config, tmp_path, port=port).start()
    try:
        serve.start()
        try:
            wait_ready(serve.metrics, 200)
            external.signal(signal.SIGKILL)
            external.proc.wait(10)  # type: ignore[union-attr]
            body = wait_ready(serve.metrics, 503)
            assert re.fullmatch(rf"milter outside: not answering \(inet:127\.0\.0\.1:{port}: "
                                r"open: Connection refused\)\n", body), body
        finally:
            serve.stop()
    finally:
        external.stop()


def test_a_stopped_redis_makes_readyz_503_with_the_reason(tmp_path: Path
                                                         ) -> None:
    with RedisServer() as redis:
        serve = Serve(tmp_path)
        serve.config.write_text(serve.config.read_text().replace(
            "store: sqlite:///state.db", f"store: {redis.url}\nstore_timeout: 1s"))
        serve.start()
        try:
            wait_ready(serve.metrics, 200)
            redis.stop()
            body = wait_ready(serve.metrics, 503)
            assert body.startswith("store: unreachable ("), body
            assert "milter" not in body and "queue" not in body
            assert get(serve.metrics, "/healthz")[0] == 200
        finally:
            serve.stop()
