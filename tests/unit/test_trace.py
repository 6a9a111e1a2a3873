"""The Received: header serve adds (RFC 5321 4.4, RFC 3848 protocol names)."""
from __future__ import annotations

import email
import email.policy
from datetime import datetime, timezone

from mta.smtp_in.trace import protocol_name, received_header

WHEN = datetime(2026, 11, 29, 1, 2, 3, tzinfo=timezone.utc)


def test_protocol_names_follow_rfc_3848() -> None:
    assert [protocol_name(e, t, a) for e, t, a in [
        (False, False, False), (True, False, False), (True, True, False), (True, False, True),
        (True, True, True)]] == ["SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA"]


def test_one_recipient_is_named_and_the_header_parses() -> None:
    raw = received_header(helo="client.example", client_ip="192.0.2.7", hostname="mx.example.jp",
                          queue_id="ABC123", protocol="ESMTPS", recipients=["taro@example.jp"],
                          when=WHEN)
    assert raw == (b"Received: from client.example (unknown [192.0.2.7])\r\n"
                   b"\tby mx.example.jp (mailmoat) with ESMTPS id ABC123\r\n"
                   b"\tfor <taro@example.jp>; Sun, 29 Nov 2026 01:02:03 +0000\r\n")
    parsed = email.message_from_bytes(raw + b"\r\nbody\r\n", policy=email.policy.default)
    assert "with ESMTPS id ABC123" in str(parsed["Received"])


def test_several_recipients_are_not_disclosed_and_ipv6_is_tagged() -> None:
    raw = received_header(helo=None, client_ip="2001:db8::7", hostname="mx", queue_id="Q",
                          protocol="ESMTP", recipients=["a@x.example", "b@x.example"], when=WHEN)
    assert b"a@x.example" not in raw and b"b@x.example" not in raw
    assert raw.startswith(b"Received: from unknown (unknown [IPv6:2001:db8::7])\r\n")
    assert raw.endswith(b"with ESMTP id Q;\r\n\tSun, 29 Nov 2026 01:02:03 +0000\r\n")


def test_a_hostile_helo_cannot_break_the_header() -> None:
    raw = received_header(helo="evil\r\nX-Injected: yes", client_ip="192.0.2.7", hostname="mx",
                          queue_id="Q", protocol="SMTP", recipients=["a@x.example"], when=WHEN)
    assert raw.count(b"\r\n") == 3 and b"\r\nX-Injected" not in raw
