"""The auth milter's memory does not grow with the mail it checks (issue 13 section 4): a
sender who sends several big DKIM-signed messages at once must not be able to push it out
of memory. Four 24 MB messages go at once through `serve` and the real auth milter
process (against a Knot DNS on loopback); its peak RSS, read from /proc, stays below half
of ONE message, while every verdict stays right: good signatures (rsa-sha256 simple body,
ed25519 relaxed body) pass, a body changed in one byte fails, an l= signature with 24 MB
appended is not a pass."""
from __future__ import annotations

import base64
import random
import re
import smtplib
import threading
from pathlib import Path
from typing import Iterator

import dkim
import pytest

from tests.harness.dns_server import KnotServer
from tests.integration.auth_world import (AUTHSERV_ID, STRANGER_IP, Keys, make_keys, message,
                                          sign_rsa, zones)
from tests.integration.test_serve import Serve

pytestmark = pytest.mark.integration

SIZE = 24 * 1000 * 1000  # each big message's body, bytes
POLICY = "internal_networks: [10.255.255.0/24]\n"  # every client here is from outside
HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


def big_body(seed: int) -> str:
    """SIZE bytes of base64 lines, CRLF ends (no line starts with a dot)."""
    noise = random.Random(seed).randbytes(SIZE // 4 * 3)
    return base64.encodebytes(noise).replace(b"\n", b"\r\n")[:SIZE - 2].decode() + "\r\n"


def signed_messages(keys: Keys) -> dict[str, bytes]:
    body = big_body(1)
    rsa = sign_rsa(message(subject="big rsa", body=body), "pass.test", keys)
    middle = len(rsa) // 2  # one base64 character in the middle of the body, changed
    tampered = rsa[:middle] + (b"B" if rsa[middle:middle + 1] == b"A" else b"A") \
        + rsa[middle + 1:]
    raw = message(subject="big ed25519", body=body)
    ed = dkim.sign(raw, b"ed", b"pass.test", keys.ed_private_b64, include_headers=HEADERS,
                   signature_algorithm=b"ed25519-sha256",
                   canonicalize=(b"relaxed", b"relaxed")) + raw
    short = message(subject="big l=", body="Signed part.\r\n")
    partial = dkim.sign(short, b"ed", b"pass.test", keys.ed_private_b64, length=True,
                        include_headers=HEADERS, signature_algorithm=b"ed25519-sha256") \
        + short + big_body(2).encode()
    return {"rsa": rsa, "ed": ed, "tampered": tampered, "partial": partial}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def gateway(tmp_path: Path, keys: Keys) -> Iterator[tuple[Serve, int]]:
    """serve with the auth milter; yields it and the auth milter's PID."""
    with KnotServer(zones(keys), tmp_path) as dns:
        serve = Serve(tmp_path, policy=POLICY, milters=(
            "milters: [{name: auth}]\n"
            f"dns: {{nameservers: [\"{dns.nameserver}\"], timeout: 5s}}\n"))
        serve.config.write_text(serve.config.read_text().replace(
            "hostname: mx.mailmoat.test", f"hostname: {AUTHSERV_ID}"))
        serve.start()
        try:
            found = serve.wait_log(r"event=milter_process_started milter=auth pid=(\d+)")
            yield serve, int(found.group(1))
        finally:
            serve.stop()


def send(port: int, raw: bytes, replies: dict[str, str], name: str) -> None:
    """One session from outside (XCLIENT), the message sent as it is (no line of it starts
    with a dot, so it needs no dot-stuffing copy)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
            client.ehlo("mail.pass.test")
            assert client.docmd("XCLIENT", f"ADDR={STRANGER_IP}")[0] == 220
            client.ehlo("mail.pass.test")
            client.mail("ceo@pass.test", [f"SIZE={len(raw)}"])
            client.rcpt("taro@example.jp")
            assert client.docmd("DATA")[0] == 354
            client.send(raw)
            client.send(b".\r\n")
            code, text = client.getreply()
            replies[name] = f"{code} {text.decode(errors='replace')}"
    except (OSError, smtplib.SMTPException, AssertionError) as exc:
        replies[name] = f"failed: {exc!r}"


def peak_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def our_header(serve: Serve, subject: str) -> str:
    """Our Authentication-Results on the delivered message with this Subject (read from
    the top of the file only)."""
    for path in (serve.dir / "maildir" / "taro@example.jp" / "new").iterdir():
        with path.open("rb") as file:
            head = file.read(8192).split(b"\r\n\r\n", 1)[0].decode(errors="replace")
        if f"\r\nSubject: {subject}\r\n" in head:
            found = re.search(rf"^Authentication-Results: ?{re.escape(AUTHSERV_ID)};"
                              r"([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M)
            assert found, head
            return re.sub(r"\s+", " ", found.group(1))
    raise AssertionError(f"no delivered message with Subject: {subject}")


def test_big_signed_messages_at_once_keep_the_auth_milter_small_and_verdicts_right(
        gateway: tuple[Serve, int], keys: Keys) -> None:
    serve, milter = gateway
    messages = signed_messages(keys)
    # A small signed message first: what the milter allocates once (imports, key parsing,
    # DNS) belongs to the baseline, not to the big messages.
    warm: dict[str, str] = {}
    send(serve.port, sign_rsa(message(subject="warm-up"), "pass.test", keys), warm, "warm")
    assert warm["warm"].startswith("250"), warm
    before = peak_kb(milter)
    replies: dict[str, str] = {}
    clients = [threading.Thread(target=send, args=(serve.port, raw, replies, name))
               for name, raw in messages.items()]
    for client in clients:
        client.start()
    for client in clients:
        client.join(600)
    growth = (peak_kb(milter) - before) * 1024

    total = sum(len(raw) for raw in messages.values())
    # Joined and handed to dkimpy, each body was held about three times over (1.3 GB for
    # ten 45 MB messages in bench/big_messages.py); hashed as it comes, none is held.
    assert growth < SIZE / 2, (f"the auth milter grew by {growth / 1e6:.1f} MB for "
                               f"{len(messages)} messages of {total / 1e6:.0f} MB in all")
    assert replies["rsa"].startswith("250") and replies["ed"].startswith("250"), replies
    assert replies["tampered"].startswith("550 5.7.1"), replies
    assert replies["partial"].startswith("550 5.7.1"), replies
    for name in ("rsa", "ed"):
        queue_id = replies[name].rsplit(" ", 1)[1]
        serve.wait_log(rf"event=delivered queue_id={queue_id} ", timeout=120)
    for subject, algorithm in (("big rsa", "rsa-sha256"), ("big ed25519", "ed25519-sha256")):
        header = our_header(serve, subject)
        assert f"dkim=pass ({algorithm}) header.d=pass.test" in header, header
        assert "spf=fail" in header and "dmarc=pass" in header, header
    # The milter's own log lines (serve's log holds its children's): one per message.
    verdicts = re.findall(r"event=auth .*?\bdkim=(\S+)", serve.text())
    assert sorted(verdicts) == sorted(["pass:pass.test"] * 3 + ["fail:pass.test",
                                                                "policy:pass.test"]), verdicts
