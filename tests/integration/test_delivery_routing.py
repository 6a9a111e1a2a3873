"""Domains are routed in one canonical form, their IDNA A-labels: a route written in Unicode
and a recipient written as A-labels (or the other way round) meet; a Unicode look-alike that
only a mapping turns into a route's domain (full-width letters, ligatures, IDNA 2003's ß→ss)
or a homograph from another script is not that domain and goes to the default route."""
from __future__ import annotations

from pathlib import Path

import pytest

from milters.core.config import QueueSettings
from mta.delivery.queue_run import deliver_due
from mta.delivery.relay import SmtpRelay
from mta.delivery.routing import Router, canonical_domain
from mta.queue.spool import Envelope, Queue, RecipientState, new_queue_id
from tests.harness.sink import SmtpSink

pytestmark = pytest.mark.integration

SETTINGS = QueueSettings(retry=(60.0,), max_age=3600.0)
T0 = 1_800_000_000.0
LOOK_ALIKES = [
    "taro@ｅxample.jp",  # full-width e: IDNA 2003 (NFKC) maps it to "example.jp"
    "taro@ＥＸＡＭＰＬＥ.ＪＰ",  # all full-width
    "taro@\u0435xample.jp",  # Cyrillic е
    "taro@exampl\u0435.jp",
    "taro@ex\u0430mple.jp",  # Cyrillic а
    "taro@e\u200bxample.jp",  # a zero-width space inside
    "taro@\ufb01le.example",  # the ligature ﬁ: NFKC makes "file.example"
    "taro@stra\u00dfe.example",  # ß: IDNA 2003 made it "strasse"
]


def route_of(router: Router, recipient: str) -> str:
    agent = router.agent_for(recipient)
    return next((domain for domain, routed in router.routes.items() if routed is agent),
                "default")


@pytest.fixture
def router() -> Router:
    return Router(SmtpRelay("default.invalid"), {
        "example.jp": SmtpRelay("route.invalid"), "例え.jp": SmtpRelay("idn.invalid"),
        "file.example": SmtpRelay("file.invalid"), "strasse.example": SmtpRelay("s.invalid")})


@pytest.mark.parametrize("recipient", LOOK_ALIKES)
def test_a_unicode_look_alike_of_a_route_domain_is_not_that_domain(router: Router,
                                                                   recipient: str) -> None:
    assert route_of(router, recipient) == "default"


@pytest.mark.parametrize("recipient, route", [
    ("taro@example.jp", "example.jp"),
    ("taro@EXAMPLE.JP.", "example.jp"),
    ("taro@mx.sub.example.jp", "example.jp"),
    ("taro@例え.jp", "xn--r8jz45g.jp"),
    ("taro@XN--R8JZ45G.JP", "xn--r8jz45g.jp"),
    ("taro@sub.例え.jp", "xn--r8jz45g.jp"),
])
def test_the_same_domain_in_any_spelling_takes_its_route(router: Router, recipient: str,
                                                         route: str) -> None:
    assert route_of(router, recipient) == route


def test_route_keys_are_a_labels() -> None:
    assert canonical_domain("例え.JP.") == "xn--r8jz45g.jp"
    assert canonical_domain("ｅxample.jp") is None


def test_a_look_alike_is_relayed_by_the_default_route_not_the_domains(tmp_path: Path) -> None:
    """Over real next hops: the route's next hop never sees mail for a look-alike."""
    queue = Queue(tmp_path)
    with SmtpSink() as default, SmtpSink() as routed:
        router = Router(SmtpRelay("127.0.0.1", default.port),
                        {"example.jp": SmtpRelay("127.0.0.1", routed.port)})
        for rcpt in ["taro@ｅxample.jp", "taro@例え.example.jp"]:
            queue.enqueue(b"Subject: x\r\n\r\nx\r\n", Envelope(
                new_queue_id(T0), "a@outside.example", [RecipientState(rcpt)], received_at=T0,
                extra={"smtputf8": "yes"}))
        deliver_due(queue, router, SETTINGS, "mx", now=T0)
        router.close_idle(everything=True)
        assert [m.rcpt_tos for m in default.wait_for(1)] == [("taro@ｅxample.jp",)]
        assert [m.rcpt_tos for m in routed.wait_for(1)] == [("taro@例え.example.jp",)]
