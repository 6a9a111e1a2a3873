"""Peak memory of `mailmoat serve` while ten 45 MB messages go through its milter chain at once.

    .venv/bin/python bench/big_messages.py [--messages N] [--size BYTES] [--dkim]

A fresh `serve` with the chain of DESIGN.md section 2: auth (SPF and DMARC against a Knot
DNS on loopback; it adds its Authentication-Results header, so every message is edited and
serve writes it anew), ratelimit (headers and body skipped), neutralize and attachments
(both read every body byte: they spool it to a file of their own and decide at end of
message), relaying to Postfix's smtp-sink. Ten clients at once each send one 45,000,000
byte MIME message (base64 lines, CRLF) from an outside address (XCLIENT), so neutralize and
attachments look at it as inbound mail and, under this policy, pass its body on unchanged. The
target (issue 13 section 4): serve's peak RSS (VmHWM, /proc/PID/status) under 150 MB. The
delivery process and each milter are reported beside it, not judged.

Everything listens on 127.0.0.1 only; every wait is bounded; every process and directory
started here is stopped or removed before exit, also on SIGTERM or Ctrl-C. Exit status 0
unless something could not run or a message did not arrive (a missed target is reported).

With --dkim the message carries an rsa-sha256 relaxed/relaxed DKIM signature (dkimpy's
signer, a 2048-bit key published in the Knot zone), so the auth milter hashes every body
byte: each message must come out with dkim=pass.
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import smtplib
import sys
import threading
import time
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from _common import (ROOT, gateway_yaml, BenchError, child_process, machine_line, run_bench,  # noqa: E402
                     sink_messages, smtp_sink, table, verdict, wait_until,
                     world_readable_tmpdir)

from tests.harness.dns_server import KnotServer  # noqa: E402
from tests.harness.ports import LOOPBACK, free_port, is_listening  # noqa: E402

SIZE = 45_000_000
MESSAGES = 10
TARGET_MB = 150  # serve's peak RSS, MB = 10^6 bytes
MILTERS = ("auth", "ratelimit", "neutralize", "attachments")
SENDER, RECIPIENT, CLIENT = "sender@outside.example", "to@example.jp", "192.0.2.80"
HELO = "mail.outside.example"
ZONE = {"outside.example": ['@ 300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"',
                            '_dmarc 300 IN TXT "v=DMARC1; p=none"', "mail 300 IN A 192.0.2.80"]}
SERVE_BAD = re.compile(r"event=(reject|milter_verdict|milter_failed|milter_process_died|"
                       r"spool_error|deferred|bounced|expired)\b|Traceback")

# Nothing is refused (bursts no run fills), and no rule applies: neutralize and attachments
# read each message and pass it (neutralize's default is pass; attachments transforms only
# mail from internal senders, and these come from outside).
POLICY = """\
policy_version: 1
internal_networks: [10.255.255.0/24]
ratelimit:
  exempt_internal: false
  limits:
    - {name: client-messages, key: client_ip, per: message, rate: 30/min, burst: 1000000}
neutralize:
  attachments: keep
defaults:
  neutralize: pass
"""


def message(size: int, index: int) -> bytes:
    """A MIME message of exactly `size` bytes: an attachment in base64 lines, CRLF ends."""
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: big message {index}\r\n"
            f"Message-ID: <big{index}.{os.getpid()}@bench.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: application/octet-stream; name=data.bin\r\n"
            "Content-Disposition: attachment; filename=data.bin\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode()
    body_len = size - len(head)
    payload = base64.encodebytes(os.urandom(body_len // 78 * 57 + 57)).replace(b"\n", b"\r\n")
    body = payload[:body_len - 2].rstrip(b"\r\n")
    return head + body + b"A" * (body_len - 2 - len(body)) + b"\r\n"


def dkim_signed(raw: bytes, zone: dict[str, list[str]]) -> bytes:
    """`raw` signed for outside.example; the key's record is added to `zone`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    record = f"v=DKIM1; k=rsa; p={public}"
    strings = " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))
    zone["outside.example"] = [*zone["outside.example"],
                               f"bench._domainkey 300 IN TXT ( {strings} )"]
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return dkim.sign(raw, b"bench", b"outside.example", private,
                     canonicalize=(b"relaxed", b"relaxed"),
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + raw


def status_kb(pid: int, name: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {name} in /proc/{pid}/status")


def mb(kb: int) -> float:
    """/proc's kB (1024 bytes) in MB (10^6 bytes)."""
    return kb * 1024 / 1e6


def write_config(workdir: Path, sink_port: int, nameserver: str) -> tuple[Path, int]:
    port, reinject, metrics = free_port(), free_port(), free_port()
    (workdir / "policy.yaml").write_text(POLICY)
    config = workdir / "config.yaml"
    milters = ", ".join(f"{{name: {name}}}" for name in MILTERS)
    config.write_text(gateway_yaml((port, reinject, metrics), sink_port,
                                   "  xclient_hosts: [127.0.0.0/8]\n") + f"""\
milters: [{milters}]
store: sqlite:///state.db
policy: policy.yaml
dns: {{nameservers: ["{nameserver}"], timeout: 5s}}
""")
    return config, port


def send(port: int, raw: bytes, results: dict[int, str], index: int) -> None:
    """One session, the message sent as it is (its lines never start with a dot)."""
    try:
        with smtplib.SMTP(LOOPBACK, port, local_hostname=HELO, timeout=600) as client:
            client.ehlo()
            if client.docmd("XCLIENT", f"ADDR={CLIENT}")[0] != 220:
                raise BenchError("XCLIENT refused")
            client.ehlo()
            for code, reply in (client.mail(SENDER, [f"SIZE={len(raw)}"]),
                                client.rcpt(RECIPIENT), client.docmd("DATA")):
                if code not in (250, 354):
                    raise BenchError(f"{code} {reply!r}")
            client.send(raw)  # sendall of the one shared bytes object: no copy per client
            client.send(b".\r\n")
            code, reply = client.getreply()
            results[index] = f"{code} {reply.decode(errors='replace')}"
    except (OSError, smtplib.SMTPException, BenchError) as exc:
        results[index] = f"failed: {exc}"


def run(args: argparse.Namespace) -> int:
    raw, zone = message(args.size, 0), dict(ZONE)
    if args.dkim:
        raw = dkim_signed(raw, zone)
    with world_readable_tmpdir("mailmoat-big-") as tmp, KnotServer(zone, tmp) as dns, \
            smtp_sink(tmp / "sink.log", user="postfix") as sink_port:
        config, port = write_config(tmp, sink_port, dns.nameserver)
        log = tmp / "serve.log"
        argv = [sys.executable, "-m", "mta.cli", "serve", "--config", str(config)]
        with child_process(argv, log=log, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           cwd=ROOT) as serve:
            wait_until(lambda: serve.poll() is not None or (
                is_listening(LOOPBACK, port)
                and "event=serve_started" in log.read_text(errors="replace")), 60, "serve")
            text = log.read_text(errors="replace")
            if serve.poll() is not None:
                raise BenchError(f"serve exited {serve.returncode}: {text}")
            pids = {"serve": serve.pid}
            found = re.search(r"event=delivery_process_started pid=(\d+)", text)
            if found is None:
                raise BenchError(f"no delivery process in the log:\n{text}")
            pids["delivery process"] = int(found.group(1))
            for name in MILTERS:
                found = re.search(rf"event=milter_process_started milter={name} pid=(\d+)", text)
                if found is None:
                    raise BenchError(f"no {name} milter in the log:\n{text}")
                pids[f"{name} milter"] = int(found.group(1))
            idle = {name: status_kb(pid) for name, pid in pids.items()}
            results: dict[int, str] = {}
            clients = [threading.Thread(target=send, args=(port, raw, results, i))
                       for i in range(args.messages)]
            start = time.perf_counter()
            for client in clients:
                client.start()
            for client in clients:
                client.join(900)
            accepted = time.perf_counter() - start
            wait_until(lambda: sink_messages(tmp / "sink.log") >= args.messages
                       and log.read_text(errors="replace").count("event=delivered ")
                       >= args.messages, 600, f"{args.messages} messages at the sink")
            delivered = time.perf_counter() - start
            peak = {name: status_kb(pid) for name, pid in pids.items()}
            text = log.read_text(errors="replace")
            problems = [line for line in text.splitlines() if SERVE_BAD.search(line)]
            queued = [int(size) for size in re.findall(r"event=queued .*\bsize=(\d+)", text)]
            passed = len(re.findall(r"event=auth .*\bdkim=pass:outside\.example\b", text))
            if args.dkim and passed != args.messages:
                problems.append(f"dkim=pass for {passed} of {args.messages} messages")
    refused = {i: r for i, r in results.items() if not r.startswith("250")}
    print(f"{args.messages} messages of {args.size:,} bytes"
          + (f" (+{len(raw) - args.size} bytes of DKIM-Signature)" if args.dkim else "")
          + " at once through"
          f" {' -> '.join(MILTERS)}: all 250 after {accepted:.1f} s, all at the sink after"
          f" {delivered:.1f} s")
    if queued:
        print(f"  queued sizes {min(queued):,}-{max(queued):,} bytes: the message with our"
              " Received and auth's Authentication-Results on top (serve wrote it anew)")
    rows = []
    for name in pids:
        judged = name == "serve"
        rows.append([name, f"{mb(idle[name]):.1f}", f"{mb(peak[name]):.1f}",
                     f"{mb(peak[name] - idle[name]):.1f}",
                     verdict(mb(peak[name]) < TARGET_MB) if judged else "-"])
    print(table(["process", "VmHWM after start-up MB", "peak VmHWM MB", "growth MB",
                 f"serve < {TARGET_MB} MB"], rows))
    print("  MB = 10^6 bytes; VmHWM (peak RSS) from /proc/PID/status, after start-up and"
          " after the last delivery")
    for line in problems[:20]:
        print(f"  FAILED: {line}")
    for index, reply in refused.items():
        print(f"  FAILED: message {index}: {reply}")
    return 1 if problems or refused or len(results) < args.messages else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--dkim", action="store_true", help="DKIM-sign the message")
    args = parser.parse_args()
    if not 1 <= args.messages <= 20 or not 1000 <= args.size <= 55_000_000:
        parser.error("--messages 1..20, --size 1000..55000000 (max_message_size is 60 MB)")
    return run_bench("big_messages.py", f" (--messages {args.messages} --size {args.size}"
                     + (" --dkim)" if args.dkim else ")"),
                     lambda: None,
                     lambda: machine_line(),
                     lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
