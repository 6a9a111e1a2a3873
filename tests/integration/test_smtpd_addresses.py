"""Addresses and names as a hostile client sends them, over the real SMTP port: Unicode
addresses without SMTPUTF8, IDN look-alikes of our relay domains, sender-specified routing,
and HELO text that tries to break the Received header we write."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from milters.core.policy.matching import parse_address_pattern
from mta.queue.spool import Queue
from tests.integration.test_smtpd_protocol import Client, greeted, server

pytestmark = pytest.mark.integration

OUTSIDER = "192.0.2.9"  # presented with XCLIENT: a client that may not relay


def outside(port: int) -> Client:
    """A session from an address outside the internal networks, after EHLO."""
    client = greeted(port)
    client.send(f"XCLIENT ADDR={OUTSIDER}\r\nEHLO outside.example\r\n".encode())
    assert client.last().startswith("220 "), "XCLIENT refused"
    assert client.last().startswith("250 ")
    return client


def answers(client: Client, *commands: str) -> list[str]:
    """The last line of each reply, for commands sent pipelined."""
    client.send("".join(c + "\r\n" for c in commands).encode())
    return client.replies(len(commands))


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[int, Queue]]:
    with server(tmp_path / "spool", relay_domains=("example.jp", "xn--r8jz45g.jp",
                                                   "strasse.de")) as running:
        yield running


# -- internationalised addresses ----------------------------------------------------------------
@pytest.mark.parametrize("mail, rcpt", [
    pytest.param("MAIL FROM:<太郎@example.jp>", None, id="unicode-sender"),
    pytest.param("MAIL FROM:<taro@例え.jp>", None, id="unicode-sender-domain"),
    pytest.param("MAIL FROM:<a@example.jp>", "RCPT TO:<花子@example.jp>", id="unicode-recipient"),
    pytest.param("MAIL FROM:<a@example.jp>", "RCPT TO:<hanako@例え.jp>",
                 id="unicode-recipient-domain"),
])
@pytest.mark.parametrize("trusted", [True, False], ids=["internal", "outside"])
def test_unicode_addresses_without_smtputf8_are_refused_553_5_6_7(
        gateway: tuple[int, Queue], mail: str, rcpt: str | None, trusted: bool) -> None:
    port, queue = gateway
    with (greeted(port) if trusted else outside(port)) as client:
        if trusted:
            client.send(b"EHLO c.example\r\n")
            client.reply()
        commands = [mail] + ([rcpt] if rcpt else [])
        replies = answers(client, *commands)
        assert replies[-1].startswith("553 5.6.7 "), replies
        if rcpt:
            assert replies[0] == "250 2.1.0 Ok"
            # The refused recipient is not in the transaction: DATA has no one to send to.
            assert answers(client, "DATA")[0].startswith("554 5.5.1"), "RCPT was kept"
    assert queue.entries() == []


def test_unicode_addresses_with_smtputf8_are_queued_with_the_domain_either_way(
        gateway: tuple[int, Queue]) -> None:
    """Our relay domain xn--r8jz45g.jp is 例え.jp: its Unicode spelling is that domain."""
    port, queue = gateway
    with outside(port) as client:
        assert answers(client, "MAIL FROM:<送信者@example.com> SMTPUTF8",
                       "RCPT TO:<花子@例え.jp>", "RCPT TO:<taro@xn--r8jz45g.jp>",
                       "RCPT TO:<次郎@example.jp>", "DATA") == \
            ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
             "354 End data with <CR><LF>.<CR><LF>"]
        client.send("Subject: テスト\r\n\r\nbody\r\n.\r\n".encode())
        assert client.last().startswith("250 2.0.0 Ok: queued as ")
    [envelope] = queue.entries()
    assert envelope.sender == "送信者@example.com"
    assert [r.address for r in envelope.recipients] == ["花子@例え.jp", "taro@xn--r8jz45g.jp",
                                                        "次郎@example.jp"]


def test_a_unicode_relay_domain_in_the_config_matches_its_a_label(tmp_path: Path) -> None:
    with server(tmp_path / "spool", relay_domains=("例え.jp",)) as (port, _):
        with outside(port) as client:
            assert answers(client, "MAIL FROM:<a@example.com>", "RCPT TO:<t@xn--r8jz45g.jp>",
                           "RCPT TO:<t@XN--R8JZ45G.JP>") == ["250 2.1.0 Ok"] + ["250 2.1.5 Ok"] * 2


@pytest.mark.parametrize("rcpt", [
    pytest.param("user@exаmple.jp", id="cyrillic-a"),       # U+0430
    pytest.param("user@еxample.jp", id="cyrillic-ie"),      # U+0435
    pytest.param("user@example.jр", id="cyrillic-er-tld"),  # U+0440 in the TLD
    pytest.param("user@例え.jp.evil.example", id="relay-domain-as-a-label-prefix"),
    # IDNA 2003 (Python's codec, used before) mapped ß to ss: straße.de was strasse.de.
    # In IDNA 2008 it is xn--strae-oqa.de, a different domain with another owner.
    pytest.param("user@straße.de", id="eszett-is-not-ss"),
    pytest.param("user@ＳＴＲＡＳＳＥ.dé", id="fullwidth-accented-tld"),
])
def test_a_unicode_look_alike_of_a_relay_domain_is_not_that_domain(
        gateway: tuple[int, Queue], rcpt: str) -> None:
    port, queue = gateway
    with outside(port) as client:
        mail, answer = answers(client, "MAIL FROM:<a@example.com> SMTPUTF8", f"RCPT TO:<{rcpt}>")
        assert mail == "250 2.1.0 Ok"
        assert answer == f"554 5.7.1 <{rcpt}>: Relay access denied", answer
    assert queue.entries() == []


def test_a_domain_that_is_no_idna_2008_name_is_refused_even_from_inside(
        gateway: tuple[int, Queue]) -> None:
    """It cannot be routed in the canonical form, so it is not accepted to be routed."""
    port, _ = gateway
    with greeted(port) as client:
        client.send(b"EHLO c.example\r\n")
        client.reply()
        replies = answers(client, "MAIL FROM:<a@example.jp> SMTPUTF8",
                          "RCPT TO:<user@snow☃.example.jp>")
        assert replies[1].startswith("553 5.1.3 "), replies


def test_valid_recipients_are_compared_as_a_labels(tmp_path: Path) -> None:
    valid = (parse_address_pattern("taro@例え.jp"), parse_address_pattern("@example.jp"))
    with server(tmp_path / "spool", relay_domains=("xn--r8jz45g.jp", "example.jp"),
                valid_recipients=valid) as (port, _):
        with outside(port) as client:
            replies = answers(client, "MAIL FROM:<a@example.com> SMTPUTF8",
                              "RCPT TO:<taro@xn--r8jz45g.jp>", "RCPT TO:<taro@例え.jp>",
                              "RCPT TO:<hanako@例え.jp>", "RCPT TO:<taro@exаmple.jp>")
    assert replies[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"], replies
    assert replies[3].startswith("550 5.1.1 <hanako@例え.jp>: "), replies
    assert replies[4] == "554 5.7.1 <taro@exаmple.jp>: Relay access denied", replies


# -- sender-specified routing ------------------------------------------------------------------
ROUTED = [
    pytest.param("victim@elsewhere.example@example.jp", id="two-ats"),
    pytest.param("victim%elsewhere.example@example.jp", id="percent-hack"),
    pytest.param("elsewhere.example!victim@example.jp", id="bang-path"),
    pytest.param('"victim@elsewhere.example"@example.jp', id="quoted-at"),
    pytest.param('"victim%elsewhere.example"@example.jp', id="quoted-percent"),
    pytest.param('"elsewhere.example!victim"@example.jp', id="quoted-bang"),
    pytest.param('"victim\\@elsewhere.example"@example.jp', id="quoted-escaped-at"),
    pytest.param('"x"@elsewhere.example@example.jp', id="quoted-then-at"),
    pytest.param("@example.jp:victim@elsewhere.example", id="source-route"),
    pytest.param("@example.jp,@relay.example:victim@elsewhere.example", id="source-route-two-hops"),
    pytest.param("@example.jp:victim@example.jp", id="source-route-to-our-domain"),
]


@pytest.mark.parametrize("rcpt", ROUTED)
def test_sender_specified_routing_from_outside_is_relay_access_denied(
        gateway: tuple[int, Queue], rcpt: str) -> None:
    port, queue = gateway
    with outside(port) as client:
        mail, answer, data = answers(client, "MAIL FROM:<a@outside.example>",
                                     f"RCPT TO:<{rcpt}>", "DATA")
        assert mail == "250 2.1.0 Ok"
        assert answer == f"554 5.7.1 <{rcpt}>: Relay access denied", answer
        assert data.startswith("554 5.5.1 "), data  # no recipient was kept
    assert queue.entries() == []


@pytest.mark.parametrize("rcpt", ["victim%elsewhere.example@example.jp",
                                  "@example.jp:victim@elsewhere.example",
                                  '"victim@elsewhere.example"@example.jp'])
def test_clients_allowed_to_relay_may_still_route(gateway: tuple[int, Queue], rcpt: str) -> None:
    """As Postfix: allow_untrusted_routing concerns untrusted clients only."""
    port, _ = gateway
    with greeted(port) as client:
        client.send(b"EHLO inside.example\r\n")
        client.reply()
        assert answers(client, "MAIL FROM:<app@example.jp>", f"RCPT TO:<{rcpt}>") == \
            ["250 2.1.0 Ok", "250 2.1.5 Ok"]


# -- client text in the headers we write -------------------------------------------------------
HOSTILE_HELO = [
    pytest.param(b"evil\x00\x01\x1b[31m\x7f.example", id="controls"),
    pytest.param(b"a\rReceived: from trusted.example (x [10.0.0.1])", id="bare-CR-header"),
    pytest.param(b"\xff\xfe\xc3(invalid-utf8\xed\xa0\x80.example", id="invalid-utf8"),
    pytest.param("ユニコード\u202e\u2028\u0085.example".encode(), id="unicode-controls"),
    pytest.param(b"x" * 500, id="very-long"),
    pytest.param(b"a b\tc (unknown [10.9.9.9])", id="spaces-and-fake-comment"),
]


def header_lines(stored: bytes) -> list[bytes]:
    head = stored.split(b"\r\n\r\n", 1)[0]
    return head.split(b"\r\n")


def assert_header_safe(stored: bytes) -> bytes:
    """Every header line we wrote: printable ASCII (tab only where it folds), no CR, LF,
    NUL, DEL or other control, nothing that is not UTF-8. Returns the Received header."""
    lines = header_lines(stored)
    received = b"\r\n".join(lines[:3])
    assert received.startswith(b"Received: from "), stored[:300]
    for line in lines[:3]:
        assert all(0x20 <= byte < 0x7f for byte in line.lstrip(b"\t")), line
        assert len(line) <= 998, len(line)  # RFC 5322 2.1.1
    return received


@pytest.mark.parametrize("helo", HOSTILE_HELO)
def test_a_hostile_helo_never_reaches_our_received_header_raw(
        gateway: tuple[int, Queue], helo: bytes) -> None:
    port, queue = gateway
    with greeted(port) as client:
        client.send(b"EHLO " + helo + b"\r\n")
        assert client.last().startswith("250 ")
        assert answers(client, "MAIL FROM:<a@example.jp>", "RCPT TO:<t@example.jp>",
                       "DATA")[-1].startswith("354")
        client.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        assert client.last().startswith("250 2.0.0 Ok: queued as ")
    [envelope] = queue.entries()
    received = assert_header_safe(queue.message(envelope.queue_id))
    name = received.split(b" ")[2]
    assert received.startswith(b"Received: from " + name + b" (unknown [127.0.0.1])\r\n")
    assert 0 < len(name) <= 255
    assert envelope.helo is not None and envelope.helo == name.decode("ascii")


def test_a_hostile_helo_through_xclient_is_made_safe_too(gateway: tuple[int, Queue]) -> None:
    port, queue = gateway
    with greeted(port) as client:
        client.send(b"XCLIENT HELO=a\x01\xffb\x7f\r\n")
        assert client.last().startswith("220 ")
        assert answers(client, "MAIL FROM:<a@example.jp>", "RCPT TO:<t@example.jp>",
                       "DATA")[-1].startswith("354")
        client.send(b"\r\nbody\r\n.\r\n")
        assert client.last().startswith("250 2.0.0 Ok: queued as ")
    [envelope] = queue.entries()
    received = assert_header_safe(queue.message(envelope.queue_id))
    assert received.startswith(b"Received: from a??b? (unknown [127.0.0.1])"), received


@pytest.mark.parametrize("addr", ["not-an-address", "1.2.3.4]\r\nX-Injected: yes",
                                  "1.2.3.4\x00"])
def test_xclient_addr_must_be_an_address(gateway: tuple[int, Queue], addr: str) -> None:
    """It goes into our Received header and the milters' macros."""
    port, _ = gateway
    with greeted(port) as client:
        client.send(f"XCLIENT ADDR={addr.split(chr(13))[0]}\r\n".encode())
        assert client.last() == "501 5.5.4 Bad ADDR syntax"


def test_a_unicode_helo_is_written_as_its_a_label(gateway: tuple[int, Queue]) -> None:
    port, queue = gateway
    with greeted(port) as client:
        client.send("EHLO mail.例え.jp\r\n".encode())
        client.reply()
        answers(client, "MAIL FROM:<a@example.jp>", "RCPT TO:<t@example.jp>", "DATA")
        client.send(b"\r\nbody\r\n.\r\n")
        assert client.last().startswith("250 2.0.0 Ok: queued as ")
    [envelope] = queue.entries()
    received = assert_header_safe(queue.message(envelope.queue_id))
    assert received.startswith(b"Received: from mail.xn--r8jz45g.jp (unknown [127.0.0.1])")


@pytest.mark.parametrize("control", ["\u0085", "\u009b", "\u2028", "\u2029"],
                         ids=["NEL", "CSI", "LINE-SEPARATOR", "PARAGRAPH-SEPARATOR"])
@pytest.mark.parametrize("quoted", [False, True], ids=["plain", "quoted"])
def test_unicode_controls_in_an_smtputf8_address_are_refused(
        gateway: tuple[int, Queue], control: str, quoted: bool) -> None:
    """Valid UTF-8, still controls: they would reach our Received header and the milters'
    {rcpt_addr} and {mail_addr} macros."""
    port, queue = gateway
    local = f'"a{control}b"' if quoted else f"a{control}b"
    with greeted(port) as client:
        client.send(b"EHLO c.example\r\n")
        client.reply()
        replies = answers(client, f"MAIL FROM:<{local}@example.jp> SMTPUTF8",
                          "MAIL FROM:<a@example.jp> SMTPUTF8", f"RCPT TO:<{local}@example.jp>")
    assert replies[0].startswith("501 5.1.7 Bad address syntax (control character)"), replies
    assert replies[1] == "250 2.1.0 Ok"
    assert replies[2].startswith("501 5.1.7 Bad address syntax (control character)"), replies
    assert queue.entries() == []
