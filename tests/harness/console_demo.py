"""A small working gateway for the console's browser tests and scripts/console_screenshots:
`mailmoat serve` with the ratelimit and attachments milters and its console, real console
accounts (`mailmoat user add --role`), and a morning's mail through it:

- the PPAP sample (Japanese, a PDF to a customer): encrypted into a ZIP, a notice to the
  sender, delivered to the sink;
- plain mail in English and in Japanese (ISO-2022-JP), delivered;
- two messages (Japanese and English subjects) for a branch whose next hop is down:
  deferred, then held by an admin (`mailmoat queue hold`);
- a client in a distrusted network: rate limit points, and its third message refused.

    with DemoGateway(work) as demo:
        demo.base                  # the console's URL
        demo.ids["ppap"]           # queue IDs by name
"""
from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import time
from email.header import Header
from pathlib import Path
from typing import Any

import httpx

from milters.core.audit import SqliteAuditLog

from tests.harness.milter_proc import ROOT
from tests.harness.ports import free_port
from tests.harness.sink import SmtpSink
from tests.integration.test_serve import Serve

WAIT = 30.0
CRLF = "\r\n"
ACCOUNTS = {  # name -> (role, password, addresses)
    "alice": ("admin", "Alice-Admin-2026", ()),
    "audrey": ("auditor", "Audrey-Audit-2026", ()),
    "taro": ("user", "Taro-User-2026", ("taro@example.jp",)),
}
BRANCH = "shiten.example"  # relayed to a next hop that is down: its mail waits
BAD_CLIENT, OTHER_BAD = "198.51.100.23", "198.51.100.77"
POLICY = f"""\
internal_networks: [127.0.0.0/8]
attachments:
  notice: {{to: sender, language: ja}}
rules:
  - name: external-recipients-get-a-zip
    when: {{direction: outbound, recipient: ["*", "!@example.jp", "!@{BRANCH}"]}}
    then: {{attachments: encrypt}}
ratelimit:
  limits:
    - {{name: per-ip, key: client_ip, per: message, rate: 2/hour, burst: 2}}
  points:
    bad_networks: {{points: 20, networks: [198.51.100.0/24]}}
    tempfail_at: 1000  # the limit refuses first, after MAIL (with a queue ID: audited)
"""
HELD = {  # name -> (subject, sender, recipient)
    "held_ja": ("【至急】請求書の送付について（12月分）", "keiri@partner.example",
                f"eigyo@{BRANCH}"),
    "held_en": ("Invoice overdue - action required", "billing@vendor.example",
                f"sales@{BRANCH}"),
}


def mailmoat(config: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "mta.cli", *args, "--config", str(config)],
                          input=stdin, cwd=ROOT, capture_output=True, text=True,
                          timeout=WAIT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"mailmoat {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def message(subject: str, sender: str, rcpt: str, body: str) -> bytes:
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {Header(subject, 'utf-8').encode(linesep=CRLF)}"
            f"\r\nMessage-ID: <{abs(hash((subject, time.time())))}@{sender.split('@')[1]}>"
            "\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n\r\n{body}\r\n").encode()


class DemoGateway:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.sink = SmtpSink()
        self.console_port = free_port()
        self.base = f"http://127.0.0.1:{self.console_port}"
        self.ids: dict[str, str] = {}
        self.refused: list[str] = []  # replies to the distrusted client's refused mail
        self.serve: Serve | None = None

    # -- set-up ----------------------------------------------------------------------------
    def __enter__(self) -> "DemoGateway":
        self.sink.__enter__()
        try:
            self._start()
            self._mail()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.serve is not None and self.serve.proc is not None:
                self.serve.stop()
        finally:
            self.sink.__exit__(None, None, None)

    def _start(self) -> None:
        down = free_port()  # nothing listens there: the branch's mail is deferred
        serve = Serve(self.work, policy=POLICY, relay=f"smtp:[127.0.0.1]:{self.sink.port}",
                      milters="milters: [{name: ratelimit}, {name: attachments}]\n"
                              f"console: {{listen: '127.0.0.1:{self.console_port}'}}\n")
        text = serve.config.read_text()
        text = text.replace("relay_domains: [example.jp]",
                            f"relay_domains: [example.jp, customer.example, {BRANCH}]")
        text = text.replace(f'relay: {{default: "smtp:[127.0.0.1]:{self.sink.port}"}}',
                            f'relay: {{default: "smtp:[127.0.0.1]:{self.sink.port}", '
                            f'routes: {{{BRANCH}: "smtp:[127.0.0.1]:{down}"}}}}')
        assert BRANCH in text.split("relay:")[-1], text
        serve.config.write_text(text)
        for name, (role, password, addresses) in ACCOUNTS.items():
            extra = [arg for address in addresses for arg in ("--address", address)]
            mailmoat(serve.config, "user", "add", name, "--role", role, *extra,
                     stdin=password + "\n")
        self.serve = serve.start()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the console did not start:\n{serve.text()[-3000:]}")
            time.sleep(0.05)

    def send(self, raw: bytes, sender: str, rcpts: list[str],
             client: str | None = None) -> str:
        """One message over SMTP (as `client`, through XCLIENT); its queue ID."""
        assert self.serve is not None
        with smtplib.SMTP("127.0.0.1", self.serve.port, timeout=WAIT) as smtp:
            smtp.ehlo("mail.partner.example")
            if client is not None:
                assert smtp.docmd("XCLIENT", f"ADDR={client}")[0] == 220
                smtp.ehlo("mail.partner.example")
            smtp.mail(sender)
            for rcpt in rcpts:
                smtp.rcpt(rcpt)
            code, reply = smtp.data(raw)
        if code != 250:
            raise smtplib.SMTPDataError(code, reply)
        return reply.decode().rsplit(" ", 1)[1]

    def _mail(self) -> None:
        assert self.serve is not None
        self.ids["ppap"] = self.send((ROOT / "samples" / "ppap-attachment-ja.eml").read_bytes(),
                                     "hanako@example.jp",
                                     ["buyer@customer.example", "taro@example.jp"])
        for n, name in enumerate(("plain-en", "plain-ja-iso2022jp")):
            raw = (ROOT / "samples" / f"{name}.eml").read_bytes()
            self.ids[name] = self.send(raw, "someone@partner.example", ["taro@example.jp"],
                                       client=f"203.0.113.{10 + n}")
        for n, (name, (subject, sender, rcpt)) in enumerate(HELD.items()):
            body = "添付の請求書をご確認ください。" if name.endswith("ja") else \
                "Please find the invoice attached."
            self.ids[name] = self.send(message(subject, sender, rcpt, body), sender, [rcpt],
                                       client=f"203.0.113.{20 + n}")
        for name in HELD:
            self.serve.wait_log(rf"event=deferred queue_id={self.ids[name]}", timeout=WAIT)
            mailmoat(self.serve.config, "queue", "hold", self.ids[name])
        for n, client in enumerate((BAD_CLIENT, BAD_CLIENT, BAD_CLIENT, OTHER_BAD)):
            raw = message(f"Special offer {n}", "promo@bulk.example", "taro@example.jp",
                          "Buy now.")
            try:
                self.ids[f"bulk{n}"] = self.send(raw, "promo@bulk.example",
                                                 ["taro@example.jp"], client=client)
            except smtplib.SMTPException as exc:  # the rate limit's refusal
                self.refused.append(str(exc))
        deadline = time.monotonic() + WAIT
        while not all(re.search(rf"event=delivered queue_id={self.ids[name]}\b",
                                self.serve.text()) for name in ("plain-en", "ppap")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mail was not delivered:\n{self.serve.text()[-3000:]}")
            time.sleep(0.1)
        # The processes write their audit batches every half second: wait for the last.
        log = SqliteAuditLog(str(self.work / "state-audit.db"))
        try:
            while not any(r.event == "delivered" for r in log.story(self.ids["plain-en"])):
                if time.monotonic() > deadline:
                    raise RuntimeError("the audit log did not get the deliveries")
                time.sleep(0.1)
        finally:
            log.close()
