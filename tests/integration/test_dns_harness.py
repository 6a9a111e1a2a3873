"""The DNS test harness: Knot DNS on loopback, misbehaving servers, a private resolv.conf,
and OpenDMARC/OpenDKIM whose lookups go to our server."""
from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.harness.dns_server import (DnsHarnessError, GarbageDnsServer, KnotServer,
                                      SilentDnsServer)
from tests.harness.isolated import isolated_argv
from tests.harness.opendmarc import OpenDkimVerifier, OpenDmarc
from tests.harness.postfix import postfix_instance
from tests.harness.sink import SmtpSink
from tests.harness.swaks import SwaksResult, run_swaks

pytestmark = pytest.mark.integration

SPF = "v=spf1 ip4:127.0.0.0/8 -all"
DMARC = "v=DMARC1; p=reject"
# Longer than one TXT string may be (255 bytes): the zone splits it.
LONG_KEY = "v=DKIM1; k=rsa; p=" + base64.b64encode(bytes(range(256)) * 2).decode()

ZONES = {
    "example.test": [
        f'@ 300 IN TXT "{SPF}"',
        f'_dmarc 300 IN TXT "{DMARC}"',
        "somehost 300 IN A 192.0.2.55",
    ],
    "fail.test": [
        '@ 300 IN TXT "v=spf1 -all"',
        f'_dmarc 300 IN TXT "{DMARC}"',
    ],
}
# XCLIENT client address for mail that must fail SPF: libspf2 passes loopback clients.
OUTSIDE_CLIENT = "192.0.2.20"

Transport = Callable[..., dns.message.Message]


def txt_record(name: str, value: str, chunk: int = 200) -> str:
    """A TXT line whose value is split into quoted strings over several lines."""
    parts = [value[i:i + chunk] for i in range(0, len(value), chunk)]
    return f"{name} 300 IN TXT (\n    " + "\n    ".join(f'"{p}"' for p in parts) + " )"


def txt_values(reply: dns.message.Message) -> list[str]:
    """Every TXT rdata in the answer, its strings joined."""
    return [b"".join(rdata.strings).decode()
            for rrset in reply.answer if rrset.rdtype == dns.rdatatype.TXT
            for rdata in rrset]


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[KnotServer]:
    zones = {origin: list(records) for origin, records in ZONES.items()}
    zones["example.test"].append(txt_record("sel._domainkey", LONG_KEY))
    with KnotServer(zones, tmp_path) as server:
        yield server


# -- Knot DNS ------------------------------------------------------------------


def test_knot_serves_spf_dkim_and_dmarc_on_its_own_loopback_address(knot: KnotServer) -> None:
    octets = knot.address.split(".")
    assert octets[0] == "127" and knot.address != "127.0.0.1"
    assert all(1 <= int(o) <= 254 for o in octets[1:])
    assert knot.port == 53 and knot.nameserver == f"{knot.address}:53"

    assert txt_values(knot.query("example.test", "TXT")) == [SPF]
    assert txt_values(knot.query("_dmarc.example.test", "TXT")) == [DMARC]
    reply = knot.query("sel._domainkey.example.test", "TXT", tcp=True)
    [rdata] = [rdata for rrset in reply.answer for rdata in rrset]
    assert len(LONG_KEY) > 255 and len(rdata.strings) == -(-len(LONG_KEY) // 200)
    assert txt_values(reply) == [LONG_KEY]

    missing = knot.query("nothing-here.example.test", "TXT")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert missing.flags & dns.flags.AA


def test_set_records_changes_what_is_served(knot: KnotServer) -> None:
    knot.set_records("example.test", ['@ 300 IN TXT "v=spf1 -all"',
                                      "new 300 IN A 192.0.2.77"])
    assert txt_values(knot.query("example.test", "TXT")) == ["v=spf1 -all"]
    assert knot.query("new.example.test", "A").answer[0][0].address == "192.0.2.77"
    assert knot.query("_dmarc.example.test", "TXT").rcode() == dns.rcode.NXDOMAIN
    # The other zone is untouched.
    assert txt_values(knot.query("_dmarc.fail.test", "TXT")) == [DMARC]


def test_set_records_with_a_broken_record_fails_and_keeps_the_old_zone(
        knot: KnotServer) -> None:
    with pytest.raises(DnsHarnessError, match="zone-reload example.test"):
        knot.set_records("example.test", ["@ 300 IN NOSUCHTYPE x"])
    assert txt_values(knot.query("example.test", "TXT")) == [SPF]
    knot.set_records("example.test", ['@ 300 IN TXT "v=spf1 ~all"'])
    assert txt_values(knot.query("example.test", "TXT")) == ["v=spf1 ~all"]


def test_knot_start_reports_a_zone_that_does_not_load(tmp_path: Path) -> None:
    server = KnotServer({"broken.test": ["@ 300 IN TXT unterminated \""]}, tmp_path,
                        start_timeout=5)
    started = time.monotonic()
    with pytest.raises(DnsHarnessError, match="(?s)could not load a zone.*broken.test"):
        server.start()
    assert time.monotonic() - started < 4
    assert not server.is_running()


# -- misbehaving servers -------------------------------------------------------


@pytest.mark.parametrize("transport", [dns.query.udp, dns.query.tcp])
def test_silent_server_makes_queries_time_out(transport: Transport) -> None:
    with SilentDnsServer() as server:
        assert server.address.startswith("127.") and server.address != "127.0.0.1"
        started = time.monotonic()
        with pytest.raises(dns.exception.Timeout):
            transport(dns.message.make_query("example.test", "TXT"), server.address,
                      timeout=0.5, port=server.port)
        assert 0.4 < time.monotonic() - started < 2
        assert len(server.queries) == 1


@pytest.mark.parametrize("short", [False, True])
@pytest.mark.parametrize("transport", [dns.query.udp, dns.query.tcp])
def test_garbage_server_answers_with_unparsable_bytes(transport: Transport,
                                                      short: bool) -> None:
    with GarbageDnsServer(short=short) as server:
        query = dns.message.make_query("example.test", "TXT")
        with pytest.raises(dns.exception.FormError) as raised:
            transport(query, server.address, timeout=2, port=server.port)
        if short:
            assert isinstance(raised.value, dns.message.ShortHeader)
        assert len(server.queries) == 1
        # The reply carries the query's ID, so clients do not drop it as a stray.
        reply = server.reply(server.queries[0])
        assert reply is not None and reply[:2] == query.id.to_bytes(2, "big")


# -- the private resolv.conf ---------------------------------------------------


def _resolv_conf_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line for line in fh if " /etc/resolv.conf " in line]


def test_isolated_argv_resolves_through_knot_and_leaves_resolv_conf_alone(
        knot: KnotServer, tmp_path: Path) -> None:
    real = Path("/etc/resolv.conf")
    before = (real.read_bytes(), os.stat(real), _resolv_conf_mounts())

    argv = isolated_argv(["getent", "hosts", "somehost.example.test"], knot.address, tmp_path)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["192.0.2.55", "somehost.example.test"]

    inside = subprocess.run(isolated_argv(["cat", "/etc/resolv.conf"], knot.nameserver,
                                          tmp_path),
                            capture_output=True, text=True, timeout=20, check=True)
    assert f"nameserver {knot.address}\n" in inside.stdout

    after = (real.read_bytes(), os.stat(real), _resolv_conf_mounts())
    assert after[0] == before[0]
    assert (after[1].st_ino, after[1].st_mtime_ns) == (before[1].st_ino, before[1].st_mtime_ns)
    assert after[2] == before[2]


def test_isolated_argv_refuses_a_port_glibc_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        isolated_argv(["true"], "127.1.2.3:5353", tmp_path)


# -- OpenDMARC behind Postfix --------------------------------------------------


def _send(port: int, domain: str, xclient_addr: str | None = None) -> SwaksResult:
    return run_swaks(port, mail_from=f"a@{domain}", rcpt="b@example.net",
                     xclient_addr=xclient_addr,
                     header=[f"From: <a@{domain}>", f"Subject: from {domain}"])


def _auth_results(data: bytes) -> list[str]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return [re.sub(r"\s+", " ", str(value)) for value in msg.get_all("Authentication-Results", [])]


def test_opendmarc_passes_aligned_spf_from_example_test(knot: KnotServer,
                                                         tmp_path: Path) -> None:
    with OpenDmarc(knot, tmp_path) as dmarc, SmtpSink() as sink, \
            postfix_instance(tmp_path, relay_port=sink.port,
                             smtpd_milters=dmarc.socket_spec) as pf:
        sent = _send(pf.smtp_port, "example.test")
        assert sent.code("DATA_END") == 250, sent.transcript
        [message] = sink.wait_for(1, timeout=15)
    results = _auth_results(message.data)
    # p=reject can only have come from the _dmarc record in Knot.
    assert "mx.test; dmarc=pass (p=reject dis=none) header.from=example.test" in results, \
        (results, dmarc.log_tail())
    assert "mx.test; spf=pass smtp.mailfrom=example.test" in results


def test_opendmarc_rejects_a_dmarc_failure_when_told_to(knot: KnotServer,
                                                        tmp_path: Path) -> None:
    with OpenDmarc(knot, tmp_path, reject_failures=True) as dmarc, SmtpSink() as sink, \
            postfix_instance(tmp_path, relay_port=sink.port,
                             smtpd_milters=dmarc.socket_spec) as pf:
        sent = _send(pf.smtp_port, "fail.test", xclient_addr=OUTSIDE_CLIENT)
        assert sent.code("DATA_END") == 550, sent.transcript
        assert "rejected by DMARC policy for fail.test" in sent.reply_by_stage["DATA_END"]
        assert sink.messages == []


def test_opendmarc_tags_a_dmarc_failure_by_default(knot: KnotServer, tmp_path: Path) -> None:
    with OpenDmarc(knot, tmp_path) as dmarc, SmtpSink() as sink, \
            postfix_instance(tmp_path, relay_port=sink.port,
                             smtpd_milters=dmarc.socket_spec) as pf:
        sent = _send(pf.smtp_port, "fail.test", xclient_addr=OUTSIDE_CLIENT)
        assert sent.code("DATA_END") == 250, sent.transcript
        [message] = sink.wait_for(1, timeout=15)
    results = _auth_results(message.data)
    assert "mx.test; dmarc=fail (p=reject dis=none) header.from=fail.test" in results, \
        (results, dmarc.log_tail())
    # "-all" was read from Knot: without the record libspf2 would say none.
    assert "mx.test; spf=fail smtp.mailfrom=fail.test" in results


# -- OpenDKIM verifier ---------------------------------------------------------


def test_opendkim_verifier_starts_and_answers(knot: KnotServer, tmp_path: Path) -> None:
    with OpenDkimVerifier(knot, tmp_path, authserv_id="mx.example") as verifier:
        assert verifier.socket_spec == f"inet:127.0.0.1:{verifier.port}"
        with socket.create_connection((verifier.host, verifier.port), timeout=5) as conn:
            # Milter option negotiation: OpenDKIM answers with its own SMFIC_OPTNEG.
            conn.sendall((13).to_bytes(4, "big") + b"O" + (6).to_bytes(4, "big")
                         + (0x1FF).to_bytes(4, "big") + (0x1FFFFF).to_bytes(4, "big"))
            reply = conn.recv(5)
        assert len(reply) == 5 and reply[4:5] == b"O"
        assert verifier.is_running()
    assert not verifier.is_running()


def test_opendkim_verifier_fetches_keys_from_knot(knot: KnotServer, tmp_path: Path) -> None:
    import dkim  # a dependency of the auth milter
    key = subprocess.run(["openssl", "genrsa", "2048"], capture_output=True, check=True).stdout
    public = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=key,
                            capture_output=True, check=True).stdout
    # A 2048-bit key is ~400 characters: several TXT strings again, read by libunbound.
    knot.set_records("example.test", ZONES["example.test"] + [txt_record(
        "sel._domainkey", "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())])
    body = (b"From: <a@example.test>\r\nTo: <b@example.net>\r\nSubject: signed\r\n"
            b"\r\nhello\r\n")
    signature = dkim.sign(body, b"sel", b"example.test", key,
                          include_headers=[b"from", b"to", b"subject"])
    data_file = tmp_path / "signed.eml"
    data_file.write_bytes(signature + body)
    with OpenDkimVerifier(knot, tmp_path) as verifier, SmtpSink() as sink, \
            postfix_instance(tmp_path, relay_port=sink.port,
                             smtpd_milters=verifier.socket_spec) as pf:
        sent = run_swaks(pf.smtp_port, mail_from="a@example.test", rcpt="b@example.net",
                         data_file=data_file)
        assert sent.code("DATA_END") == 250, sent.transcript
        [message] = sink.wait_for(1, timeout=15)
    [result] = [r for r in _auth_results(message.data) if "dkim=" in r]
    assert re.match(r"mx\.test; dkim=pass \(2048-bit key; unprotected\) header\.d=example\.test"
                    r" .*header\.s=sel", result), result
