"""The overview: what each series counts (held on arrival and milter refusals included,
from records as the tee writes them, on the memory, SQLite and Redis logs), the page's SVG
charts (no script, no style attribute, escaped text), its tables, the ratelimit's top
sources, the API, and a user refused."""
from __future__ import annotations

import ipaddress
import logging
import re
import sqlite3
from pathlib import Path
from typing import Iterator
from xml.etree import ElementTree

import pytest
from starlette.testclient import TestClient

from milters.core.audit import AuditLog, MemoryAuditLog, SqliteAuditLog, open_audit_log
from milters.core.audit.tee import AuditTee
from milters.core.config import ConsoleSettings, load_config
from milters.core.eventlog import log_event
from milters.core.store import MemoryStore
from milters.ratelimit.limiter import points_key
from mta.console import charts
from mta.console.app import create_app
from mta.console.identity import Actor
from mta.console.security import CSP
from mta.operations import Forbidden, Operations
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.console_login import ACCOUNTS, StandInLogin

KEY = b"overview-pages-test-key-" * 3
ADMIN = Actor("alice", "admin", frozenset(), "192.0.2.1")
SVG = "{http://www.w3.org/2000/svg}"


def redis_log(request: pytest.FixtureRequest, tmp_path: Path) -> AuditLog:
    """The audit log on the run's real Redis (its keys cleared before and after)."""
    import redis
    server = request.getfixturevalue("redis_server")
    client = redis.Redis(host=server.host, port=server.port, decode_responses=True)

    def forget() -> None:
        for key in client.scan_iter(match="mailmoat.audit:*"):
            client.delete(key)
    forget()
    request.addfinalizer(forget)
    request.addfinalizer(client.close)
    (tmp_path / "gateway.yaml").write_text(f"store: {server.url}\n")
    return open_audit_log(load_config(tmp_path / "gateway.yaml"))


@pytest.fixture(params=["memory", "sqlite", "redis"])
def audit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditLog]:
    log: AuditLog = MemoryAuditLog() if request.param == "memory" \
        else SqliteAuditLog(str(tmp_path / "state-audit.db")) if request.param == "sqlite" \
        else redis_log(request, tmp_path)
    logger = logging.getLogger("mailmoat")
    handler, level = AuditTee(log, "serve"), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield log
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        log.close()


def gateway_day(queue: Queue, ops: Operations) -> None:
    """A few messages as serve's processes log them (the tee records each line)."""
    # Held on arrival (a DMARC quarantine): smtpd's queued carries the hold reason.
    log_event("queued", queue_id="H1", ip="192.0.2.7", sender="a@outside.example",
              nrcpt=1, rcpts="taro@example.jp", size=900, message_id="<h1@x>",
              held="DMARC: p=quarantine for outside.example")
    # Two that went through: queued without a hold (held=None is left out of the record).
    for queue_id in ("P1", "P2"):
        log_event("queued", queue_id=queue_id, ip="192.0.2.8", sender="b@outside.example",
                  nrcpt=1, rcpts="taro@example.jp", size=900, message_id=None, held=None)
        log_event("delivered", queue_id=queue_id, to="taro@example.jp")
    log_event("attachments", milter="attachments", queue_id="P1", action="encrypt",
              zip="AttachFile.zip", rcpts="x@customer.example")
    log_event("neutralized", milter="neutralize", queue_id="P2", parts=1)
    log_event("bounced", queue_id="P2", to="gone@example.jp")
    # Refused by milters (the chain's verdicts; an accept is not a refusal).
    for action in ("reject", "discard", "tempfail", "accept"):
        log_event("milter_verdict", milter="ratelimit", stage="rcpt", action=action,
                  reply="550 5.7.1 no", queue_id=f"R-{action}")
    log_event("reject", stage="data", queue_id="R5", ip="192.0.2.9", reason="too big")
    # An admin's hold: appended by the operations themselves.
    queued = queue.enqueue(b"Subject: x\r\n\r\nx\r\n", Envelope(
        new_queue_id(), "c@outside.example", [RecipientState("taro@example.jp")], 1e9))
    ops.hold(ADMIN, queued, "looks odd")


def test_each_series_counts_what_the_gateway_records(tmp_path: Path, audit: AuditLog) -> None:
    queue = Queue(tmp_path / "spool")
    ops = Operations(queue, audit)
    gateway_day(queue, ops)
    audit.flush()
    import time
    view = ops.overview(ADMIN, now=time.time(), step=3600, buckets=48)
    assert view.totals == {"received": 3, "rejected": 4, "held": 2, "encrypted": 1,
                           "neutralized": 1, "delivered": 2, "bounced": 1}
    assert view.series["held"][-1] == 2 and sum(view.series["held"][:-1]) == 0
    day = ops.overview(ADMIN, now=time.time(), step=86400, buckets=30)
    assert day.totals == view.totals


def test_a_row_changed_into_broken_json_is_counted_by_its_event_only(tmp_path: Path) -> None:
    log = SqliteAuditLog(str(tmp_path / "state-audit.db"))
    log.append("queued", queue_id="Q1", held="DMARC", now=7200.0)
    log.append("queued", queue_id="Q2", held="DMARC", now=7201.0)
    log.flush()
    with sqlite3.connect(tmp_path / "state-audit.db") as db:
        db.execute("UPDATE audit SET fields = '{broken' WHERE seq = 1")
    assert log.counts(since=0, until=10**6, step=3600) == {
        (7200.0, "queued"): 2, (7200.0, "queued:held"): 1}
    log.close()


def test_a_user_may_not_see_the_overview(tmp_path: Path) -> None:
    ops = Operations(Queue(tmp_path / "spool"), MemoryAuditLog())
    with pytest.raises(Forbidden):
        ops.overview(Actor("taro", "user", frozenset({"taro@example.jp"}), "x"),
                     now=1e9, step=3600, buckets=2)


class World:
    def __init__(self, tmp_path: Path, audit: AuditLog, store: MemoryStore | None = None
                 ) -> None:
        self.queue = Queue(tmp_path / "spool")
        self.ops = Operations(self.queue, audit, store)
        self.app = create_app(ConsoleSettings(), key=KEY, authenticate=StandInLogin(),
                              operations=self.ops)

    def client(self, name: str, language: str = "en") -> TestClient:
        client = TestClient(self.app, base_url="http://127.0.0.1",
                            headers={"accept-language": language})
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
        assert token
        reply = client.post("/login", data={"csrf_token": token.group(1), "name": name,
                                            "password": ACCOUNTS[name][0]},
                            follow_redirects=False)
        assert reply.status_code == 303, reply.text
        return client


def svgs(html: str) -> list[ElementTree.Element]:
    """Each <svg class="chart"> of a page, parsed as XML (it must be well-formed)."""
    return [ElementTree.fromstring(m) for m in
            re.findall(r'<svg xmlns=\S+ id="chart-[a-z]+".*?</svg>', html, flags=re.S)]


def test_the_page_draws_both_periods_as_svg_with_tables(tmp_path: Path,
                                                        audit: AuditLog) -> None:
    store = MemoryStore()
    import time
    now = time.time()
    for ip, points in (("192.0.2.7", 9.0), ("2001:db8::1", 30.0)):
        store.points_add(points_key(ipaddress.ip_address(ip)), points, half_life=3600, now=now)
    world = World(tmp_path, audit, store)
    gateway_day(world.queue, world.ops)
    audit.flush()
    for name in ("alice", "audrey"):
        page = world.client(name).get("/overview")
        assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
        html = page.text
        charts_ = svgs(html)
        assert [c.get("id") for c in charts_] == ["chart-hour", "chart-day"]
        hour = charts_[0]
        assert hour.get("role") == "img" and hour.find(f"{SVG}title").text == \
            "Per hour, last 48 hours"
        lines = hour.findall(f"{SVG}polyline")
        assert len(lines) == 7 and all(len(l.get("points").split()) == 48 for l in lines)
        assert len(charts_[1].find(f"{SVG}polyline").get("points").split()) == 30
        # Nothing the CSP would block: no style attribute or element, no script but ours.
        assert "style=" not in html and "<style" not in html
        assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/console.js" defer>']
        totals = dict(re.findall(r'<td class="num" data-series="(\w+)">(\d+)</td>', html))
        assert totals["held"] == "2" and totals["rejected"] == "4"
        assert re.search(r'id="counts-hour".*?<tbody>(.*?)</tbody>', html, re.S).group(1) \
            .count("<tr>") == 48
        sources = re.search(r'id="top-sources".*?</section>', html, re.S).group(0)
        assert sources.index("2001:db8::1") < sources.index("192.0.2.7")
    ja = world.client("alice", "ja").get("/overview").text
    assert "1 時間ごと（直近 48 時間）" in ja and "保留: 2" in ja


def test_the_api_by_hour_and_by_day(tmp_path: Path, audit: AuditLog) -> None:
    world = World(tmp_path, audit)
    gateway_day(world.queue, world.ops)
    audit.flush()
    client = world.client("audrey")
    hour = client.get("/api/overview", params={"step": "hour"}).json()
    assert (hour["step"], hour["seconds"], len(hour["starts"])) == ("hour", 3600, 48)
    assert hour["totals"]["held"] == 2 and len(hour["series"]["received"]) == 48
    day = client.get("/api/overview", params={"step": "day"}).json()
    assert (day["seconds"], len(day["starts"]), day["totals"]) == (86400, 30, hour["totals"])
    assert client.get("/api/overview").json()["step"] == "hour"
    for bad in ("minute", "3600", "", "day;drop"):
        answer = client.get("/api/overview", params={"step": bad})
        assert answer.status_code == 400 and answer.json()["error"] == "bad_request"
    assert TestClient(world.app).get("/api/overview").status_code == 401


def test_a_user_gets_403_and_no_overview_in_the_navigation(tmp_path: Path) -> None:
    world = World(tmp_path, MemoryAuditLog())
    user = world.client("taro@example.jp")
    page = user.get("/overview")
    assert page.status_code == 403 and "administrators and auditors" in page.text
    assert 'href="/overview"' not in page.text and 'href="/audit"' in page.text
    answer = user.get("/api/overview")
    assert answer.status_code == 403 and answer.json()["error"] == "forbidden"
    assert 'href="/overview"' in world.client("audrey").get("/held").text


def test_chart_text_is_escaped_and_the_scale_is_round() -> None:
    # Whole-number ticks 1, 2 or 5 times a power of ten apart, at most five above 0.
    assert [charts.scale(n) for n in (0, 3, 5, 9, 11, 20, 21, 99, 101, 4999)] == [
        (4, 1), (4, 1), (5, 1), (10, 2), (15, 5), (20, 5), (25, 5), (100, 20), (150, 50),
        (5000, 1000)]
    hostile = "<script>alert(1)</script>"
    svg = charts.line_chart("x\"><script>", hostile, [hostile, "b"],
                            [charts.Series("held\" onload=\"x", hostile, [1, 2])])
    parsed = ElementTree.fromstring(str(svg))
    assert parsed.find(f"{SVG}title").text == hostile  # as text, not as an element
    assert parsed.find(f".//{SVG}script") is None and "onload" not in parsed.find(
        f"{SVG}polyline").attrib
    assert parsed.get("id") == "x___script_"
    legend = str(charts.legend([charts.Series("held", hostile, [3])]))
    assert "<script>" not in legend and "&lt;script&gt;alert(1)&lt;/script&gt;: 3" in legend
    empty = ElementTree.fromstring(str(charts.line_chart("e", "empty", [], [])))
    assert empty.find(f"{SVG}polyline") is None
