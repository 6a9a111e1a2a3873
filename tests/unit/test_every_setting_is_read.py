"""No setting is accepted and ignored: every leaf key of every schema (the gateway config of
milters/core/config.py and the policy with each milter's section) is enumerated from the
Struct definitions, and each must have a probe here that proves it changes behaviour.

A probe is two texts (the key at its default or absent, then set to another value) and an
observer that runs the real consumer of the loaded config -- the policy's decision, the
rate limiter, the auth, neutralize or attachments checker (with its Nextcloud client, its
converters in their sandbox), the policy test runner, the store opener, the milter
supervisor, serve's SMTP server and listeners, delivery -- and returns what it decided. The probe passes when
the two decisions differ; a "parsed object differs" check is never enough, because the
observer only sees what the consumer does.

Adding a probe for a new key is a few lines in GATEWAY_PROBES or POLICY_PROBES:

    "auth.on_bad_from": Probe(AUTH_BASE, AUTH_BASE + "auth: {on_bad_from: reject}\\n",
                              auth_verdict(no_from)),

Texts may name things started for each load: @SINK@ (the loopback next hop), @NC@ and
@NCS@ (a fresh fake Nextcloud, HTTP or HTTPS), @PORT1@..@PORT4@ (free loopback ports).

UNPROVEN holds the keys still without a probe, each with why: work left, never a pass; it
may only shrink (a key that gets a probe must leave it). It holds two console.ldap keys.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote

import dkim
import pytest

from milters.attachments.logic import AttachmentsChecker
from milters.auth.checker import AuthChecker
from milters.core.config import _spec as gateway_spec
from milters.core.config import load_config
from milters.core.dns import Resolver
from milters.core.errors import ConfigError
from milters.core.message import Envelope, Message, Recipient
from milters.core.policy.document import Policy, _build_spec, load_policy_text
from milters.core.policy.rules import Facts
from milters.core.policy.schema import Either, ListOf, MapOf, Spec, Struct
from milters.core.errors import LoginError
from milters.core.store import MemoryStore, open_gateway_store
from mta.console.accounts import set_account
from mta.console.login import authenticate
from tests.harness.slapd import ADMINS as SLAPD_ADMINS
from tests.harness.slapd import AUDITORS as SLAPD_AUDITORS
from tests.harness.slapd import GROUPS as SLAPD_GROUPS
from tests.harness.slapd import PASSWORDS as SLAPD_PASSWORDS
from tests.harness.slapd import PEOPLE as SLAPD_PEOPLE
from tests.harness.slapd import READER_PW as SLAPD_READER_PW
from tests.harness.slapd import Slapd
from milters.neutralize import jail
from milters.neutralize.logic import NeutralizeChecker
from milters.neutralize.sandbox import PREFIX as SANDBOX_PREFIX
from milters.ratelimit.limiter import RateLimiter
from milters.core.errors import MailmoatError
from mta.gateway import privileges
from mta.cli import EXTENSIONS, read_policy
from mta.delivery.queue_run import deliver_one
from mta.delivery.routing import build_router
from mta.delivery.process import DeliveryProcess
from mta.gateway.listener import start_listener
from mta.queue.spool import Envelope as QueuedEnvelope
from mta.queue.spool import Queue, RecipientState, new_queue_id
from mta.gateway.serve import (open_listeners, reinject_smtp_settings, server_tls, smtp_settings,
                               user_file)
from mta.smtp_in.server import GatewayHandler, SmtpConnection
from mta.smtp_in.users import set_password
from tests.harness import broken_files
from tests.harness import documents as docs
from tests.harness.certs import TestCa, server_context
from tests.harness.nextcloud_fake import NextcloudFake
from tests.harness.ports import free_port
from tests.harness.sink import SmtpSink
from mta.gateway.serve import MilterSupervisor
from tests.conftest import ROOT
from tests.unit.test_auth_checker import ZONE, DictResolver, txt

THIS_FILE = "tests/unit/test_every_setting_is_read.py"
Observer = Callable[[Any], object]


@dataclass(frozen=True)
class Probe:
    before: str  # the key at its default, or absent
    after: str  # the key set to a value that must change what the consumer decides
    observe: Observer  # runs the real consumer of the loaded config; returns its decision


# -- enumerating the schemas -----------------------------------------------------------------
def leaf_keys(spec: Spec, path: str = "") -> Iterator[str]:
    """Dotted paths of every leaf key: `[]` stands for any list item, `*` for any map key."""
    if isinstance(spec, Struct):
        for key, field in spec.fields.items():
            yield from leaf_keys(field.spec, f"{path}.{key}" if path else key)
    elif isinstance(spec, ListOf) and isinstance(spec.item, (Struct, Either)):
        yield from leaf_keys(spec.item, path + "[]")
    elif isinstance(spec, MapOf) and isinstance(spec.value, (Struct, Either)):
        yield from leaf_keys(spec.value, path + ".*")
    elif isinstance(spec, Either):  # `neutralize: pass` and `neutralize: {links: keep}`
        yield path
        yield from leaf_keys(spec.mapping, path)
    else:
        yield path


def gateway_keys() -> list[str]:
    return list(leaf_keys(gateway_spec(Path("."), "(walk)")))


def policy_keys() -> list[str]:
    return list(dict.fromkeys(leaf_keys(_build_spec(EXTENSIONS))))


# -- loading ---------------------------------------------------------------------------------
def policy(text: str) -> Policy:
    if "@NC" in text:  # a fake Nextcloud, started for this load (see _with_cloud)
        text = _with_cloud(text)
    return load_policy_text(textwrap.dedent(text), EXTENSIONS, "probe.yaml")


_CONFIG_DIR: list[Path] = []


_PORTS: dict[str, int] = {}  # @PORTn@ -> the free port it stood for in the last load


def gateway(text: str) -> Any:
    path = _CONFIG_DIR[0] / "gateway.yaml"
    if "@SINK@" in text:  # the loopback next hop (offers STARTTLS), started on first use
        text = text.replace("@SINK@", str(next_hop().port))
    _PORTS.clear()
    if "@PORT" in text:  # four loopback ports free now, chosen afresh for each load
        for n in range(1, 5):
            _PORTS[f"@PORT{n}@"] = free_port()
            text = text.replace(f"@PORT{n}@", str(_PORTS[f"@PORT{n}@"]))
    if "@LDAP@" in text:  # the private slapd of the console login probes
        text = text.replace("@LDAP@", ldap_server().url)
    path.write_text(textwrap.dedent(text))
    return load_config(path)


# -- observers: each runs a real consumer ----------------------------------------------------
def env(client: str = "198.51.100.7", sender: str = "a@sender.example",
        rcpts: tuple[str, ...] = ("u@example.jp",), auth_user: str | None = None) -> Envelope:
    return Envelope(client_ip=client, helo="mail.sender.test", mail_from=sender,
                    auth_user=auth_user, recipients=[Recipient(r) for r in rcpts],
                    queue_id="4Probe")


def decision(milter: str, **facts: Any) -> Observer:
    """The policy's decision for `milter` on a message with these facts."""
    def observe(pol: Policy) -> object:
        base = Facts.from_envelope(env(**{k: v for k, v in facts.items()
                                          if k in ("client", "sender", "rcpts", "auth_user")}),
                                   pol.internal_networks)
        base.auth = facts.get("auth")
        base.subject = facts.get("subject", "")
        found = pol.decide(milter, base)
        return (found.action, found.rule)
    return observe


def policy_tests(pol: Policy) -> object:
    """What `mailmoat policy test` reports: each test's failed expectations."""
    by_name = {ext.name: ext for ext in EXTENSIONS}
    return [(test.name, [problem for milter, expected in test.expect.items()
                         for problem in by_name[milter].run_test(pol, test, expected)])
            for test in pol.tests]


def ratelimit(sessions: int = 4, rcpts: int = 1, client: str = "198.51.100.7",
              sender: str = "a@bulk.example", rejected: int = 0, without_mail_first: int = 0,
              vary_sender: bool = False,
              auth_user: str | None = None, wait: float = 0.0,
              auth_results: list[tuple[str, str]] | None = None,
              store_down: bool = False) -> Observer:
    """The replies the rate limiter gives to `sessions` SMTP sessions in a row."""
    def observe(pol: Policy) -> object:
        clock = [1_700_000_000.0]
        store = MemoryStore()
        if store_down:
            from milters.core.errors import StoreUnavailable

            def down(*args: object, **kwargs: object) -> object:
                raise StoreUnavailable("probe: the store is down")
            for name in ("admit", "bucket_take", "points_add", "points_get", "record_apply"):
                if hasattr(store, name):
                    setattr(store, name, down)
        limiter = RateLimiter(store, clock=lambda: clock[0])
        replies = []
        for index in range(sessions):
            session = limiter.session(pol)
            e = Envelope(client_ip=client, auth_user=auth_user)
            verdict = session.on_connect(e)
            if index >= without_mail_first and not verdict.ends_transaction:
                e.mail_from = f"s{index}@bulk.example" if vary_sender else sender
                verdict = session.on_mail(e)
                for n in range(rcpts + rejected):
                    if verdict.ends_transaction:
                        break
                    rcpt = Recipient(f"u{n}@example.jp", rejected_by_mta=n >= rcpts)
                    e.recipients.append(rcpt)
                    verdict = session.on_rcpt(e, rcpt)
                if auth_results and not verdict.ends_transaction:
                    session.on_auth_results(e, auth_results)
            session.on_close(e)
            limiter.flush(pol.sections["ratelimit"])
            replies.append(str(verdict.reply) if verdict.reply else verdict.action.name)
            clock[0] += wait
        return replies
    return observe


AUTH_BASE = "internal_networks: [127.0.0.0/8]\n"
# MAIL FROM's domain takes two lookups (one of them void) before its ip4 passes.
SPF_ZONE = {**ZONE, ("attacker.test", "TXT"): [txt("v=spf1 a:void.test a:mail.sender.test "
                                                   "ip4:192.0.2.0/24 -all")],
            ("mail.sender.test", "A"): ZONE[("mail.sender.test", "A")]}
PCT_ZONE = {**ZONE, ("_dmarc.pct.test", "TXT"): [txt("v=DMARC1; p=reject; pct=0")]}


def auth_message(from_line: str | None = "CEO <ceo@reject.test>",
                 mail_from: str = "bounce@attacker.test", client: str = "192.0.2.10",
                 auth_user: str | None = None, extra: bytes = b"") -> Message:
    head = extra + (f"From: {from_line}\r\n".encode() if from_line else b"")
    head += b"To: bob@recipient.test\r\nSubject: Invoice\r\nMessage-ID: <m1@sender.test>\r\n"
    return Message(raw=head + b"\r\nHello.\r\n",
                   envelope=Envelope(client_ip=client, helo="mail.sender.test",
                                     mail_from=mail_from, auth_user=auth_user,
                                     queue_id="4Probe"))


def auth_verdict(make: Callable[[], Message] = auth_message,
                 zone: dict[tuple[str, str], object] | None = None,
                 store: MemoryStore | None = None) -> Observer:
    """The auth milter's verdict and the Authentication-Results it writes."""
    def observe(pol: Policy) -> object:
        records = store if store is not None else MemoryStore()
        checker = AuthChecker("mx.probe.test", DictResolver(ZONE if zone is None else zone),
                              sample=lambda: 0.99, store=records)
        result = checker.check(make(), pol)
        headers = [getattr(e, "value", "") for e in result.edits]
        return (result.verdict.action, str(result.verdict.reply), headers,
                sorted(k for k, _ in _records(records)))
    return observe


def _records(store: MemoryStore) -> list[tuple[str, object]]:
    return [(r.key, r) for r in store.records("")]


NOW = datetime(2026, 11, 28, 10, 30, tzinfo=timezone.utc)
PPAP = (ROOT / "samples" / "ppap-attachment-ja.eml").read_bytes().replace(
    b"\r\n", b"\n").replace(b"\n", b"\r\n")
def mail_with(name: str, size: int) -> bytes:
    """An outgoing message from hanako@example.jp with one attachment."""
    from email import policy as email_policy
    from email.message import EmailMessage
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = ("hanako@example.jp",
                                                          "buyer@customer.example", "Files")
    message["Message-ID"] = "<probe.1@example.jp>"
    message.set_content("Files attached.\n")
    message.add_attachment(b"x" * size, maintype="application", subtype="octet-stream",
                           filename=name)
    return message.as_bytes(policy=email_policy.SMTP)


ATT_BASE = """\
internal_networks: [127.0.0.0/8, 10.0.0.0/8]
rules:
  - name: outside
    when: {direction: outbound, recipient: ["*", "!@example.jp"]}
    then: {attachments: encrypt}
"""


def attachments(rcpts: tuple[str, ...] = ("buyer@customer.example",), client: str = "10.1.0.5",
                raw: bytes = PPAP, sender: str = "hanako@example.jp") -> Observer:
    """The attachments milter's verdict, its edits and what it re-injects (copies, notices),
    with the ZIP and note bodies reduced to what a setting can change."""
    def observe(pol: Policy) -> object:
        sent: list[tuple[str, list[str], bytes, float]] = []

        def send(listen: str, mail_from: str, to: list[str], data: object,
                 timeout: float) -> str:
            body = data if isinstance(data, bytes) else b"".join(data)  # type: ignore[arg-type]
            sent.append((mail_from, list(to), body, timeout))
            return "250 2.0.0 Ok"
        checker = AttachmentsChecker("mx.example.jp", "127.0.0.1:10026", clock=lambda: NOW,
                                     send=send)
        e = env(client=client, sender=sender, rcpts=rcpts)
        result = checker.check(Message(raw=raw, envelope=e), pol)
        return (result.verdict.action, str(result.verdict.reply),
                _edited(raw, result.edits),
                [(f, t, _summary(b), timeout) for f, t, b, timeout in sent])
    return observe


def _edited(raw: bytes, edits: list[object]) -> object:
    """The message as the edits leave it, summarised (the original's header with the
    changed MIME fields, then the new body), and the other edits as they are."""
    head = raw[:raw.index(b"\r\n\r\n") + 2]
    body, others = None, []
    for edit in edits:
        new = getattr(edit, "body", None)
        if new is not None:
            body = new if isinstance(new, bytes) else new.read()
        elif type(edit).__name__ in ("ChangeHeader", "AddHeader") and \
                getattr(edit, "name", "").lower().startswith(("content-", "mime-")):
            head = _set_field(head, edit.name, edit.value)  # type: ignore[attr-defined]
        else:
            others.append(repr(edit))
    return (others, _summary(head + b"\r\n" + body) if body is not None else None)


def _set_field(head: bytes, name: str, value: str) -> bytes:
    import re
    pattern = re.compile(rb"(?im)^" + re.escape(name.encode()) + rb":.*(?:\r\n[ \t].*)*\r\n")
    head = pattern.sub(b"", head)
    return head + f"{name}: {value.strip()}\r\n".encode() if value else head


def _summary(data: bytes) -> object:
    """What settings can change in a message we made, without the random parts (the ZIP's
    bytes, the password): its headers, texts and attachment names and types."""
    import email
    from email import policy as email_policy
    message = email.message_from_bytes(data, policy=email_policy.default)
    parts = []
    for part in message.walk():
        if part.is_multipart():
            continue
        name = part.get_filename()
        kind = part.get_content_type()
        if kind == "text/plain" and not name:
            text = part.get_content()
            parts.append((kind, text.replace(_password_line(text), "")))
        else:
            parts.append((kind, name, part.get("Content-Transfer-Encoding"),
                          _zip_flags(part) if kind == "application/zip" else None))
    return (message.get("Subject"), message.get("From"), message.get("Content-Type", "")
            .split(";")[0], parts)


def _password_line(text: str) -> str:
    import re
    found = re.search(r"(■パスワード|\nPassword)\s*\n\s*(\S+)", text)
    return found.group(2) if found else "\0"


def _zip_flags(part: Any) -> object:
    """The ZIP's encryption method and name encoding, per entry (not its random bytes)."""
    import io
    import zipfile
    data = part.get_payload(decode=True)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, info.flag_bits, info.compress_type)
                for info in archive.infolist()]


NEU_BASE = """\
internal_networks: [127.0.0.0/8]
rules:
  - {name: all, when: {}, then: {neutralize: neutralize}}
"""
HTML_MAIL = (b"From: a@bank.example\r\nTo: u@example.jp\r\nSubject: Hello\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
             b"--B\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
             b"<p>Pay at <a href=\"https://evil.example/pay\">https://evil.example/pay</a>"
             b"<img src=\"https://track.example/x.png\"></p>\r\n"
             b"--B\r\nContent-Type: text/plain; name=notes.txt\r\n"
             b"Content-Disposition: attachment; filename=notes.txt\r\n\r\nplain notes\r\n"
             b"--B--\r\n")


ZIP_MAIL = (ROOT / "samples" / "neutralize-ppap-zip-ja.eml").read_bytes().replace(
    b"\r\n", b"\n").replace(b"\n", b"\r\n")


def neutralize(raw: bytes = HTML_MAIL, client: str = "198.51.100.7",
               auth_user: str | None = None, sender: str = "a@bank.example",
               dmarc_pass_for: str | None = None) -> Observer:
    """The neutralize milter's verdict and edits on a message (no conversion needed)."""
    def observe(pol: Policy) -> object:
        extra = b""
        if dmarc_pass_for:
            extra = (f"Authentication-Results: mx.probe.test; dmarc=pass "
                     f"header.from={dmarc_pass_for}\r\n").encode()
        e = Envelope(client_ip=client, mail_from=sender, auth_user=auth_user,
                     recipients=[Recipient("u@example.jp")], queue_id="4Probe")
        result = NeutralizeChecker("mx.probe.test").check(Message(raw=extra + raw,
                                                                  envelope=e), pol)
        edits = []
        for edit in result.edits:
            body = getattr(edit, "body", None)
            if body is not None:
                edits.append(body if isinstance(body, bytes) else body.read())
            else:
                edits.append(repr(edit))
        return (result.verdict.action, str(result.verdict.reply), edits)
    return observe


def store_opened(config: Any) -> object:
    """What open_gateway_store (the ratelimit and auth milters' and the CLI's store) opens."""
    try:
        store = open_gateway_store(config)
    except ConfigError as exc:
        return ("refused", exc.problems)
    try:
        client = getattr(store, "_client", None)
        password = client.connection_pool.connection_kwargs.get("password") if client else None
        return (type(store).__name__, getattr(store, "path", None),
                getattr(store, "_timeout", None), password)
    finally:
        store.close()


def chain_members(config: Any) -> object:
    """The milter chain serve builds: endpoints, failure replies, connection reuse."""
    return [(m.endpoint.name, m.endpoint.socket, m.on_failure, m.reuse_connection,
             m.endpoint.connect_timeout, m.endpoint.command_timeout, m.endpoint.content_timeout)
            for m in MilterSupervisor(config, None).members()]


# -- the probes ------------------------------------------------------------------------------
def swap(base: str, old: str, new: str) -> tuple[str, str]:
    assert old in base, old
    return base, base.replace(old, new, 1)


RL = """\
internal_networks: [127.0.0.0/8]
ratelimit:
  limits:
    - {name: per-ip, key: client_ip, per: message, rate: 6/min, burst: 3}
"""


def rl(setting: str, observe: Observer, base: str = RL) -> Probe:
    """A ratelimit probe: `setting` is YAML under `ratelimit:`."""
    return Probe(base, base + textwrap.indent(setting, "  ") + "\n", observe)


def att(setting: str, observe: Observer | None = None, base: str = ATT_BASE) -> Probe:
    """An attachments probe: `setting` is a flow mapping under `attachments:`."""
    return Probe(base, base + f"attachments: {setting}\n", observe or attachments())


def neu(setting: str, observe: Observer | None = None, base: str = NEU_BASE) -> Probe:
    return Probe(base, base + f"neutralize: {setting}\n", observe or neutralize())


def auth(setting: str, observe: Observer | None = None, base: str = AUTH_BASE) -> Probe:
    return Probe(base, base + f"auth: {setting}\n", observe or auth_verdict())


RULE = "rules:\n  - name: r\n    when: {}\n    then: {ratelimit: exempt}\n"
AUTH_RULE = RULE.replace("then: {ratelimit: exempt}", "then: {auth: tag}")
TESTED = """\
rules:
  - name: r
    when: {client_ip: [192.0.2.0/24]}
    then: {ratelimit: exempt, auth: tag, neutralize: pass, attachments: pass}
tests:
  - name: t
    message: {client_ip: 192.0.2.1, rcpt: [u@example.jp]}
    expect: {ratelimit: {action: exempt}}
"""


def policy_test_probe(old: str, new: str) -> Probe:
    return Probe(*swap(TESTED, old, new), policy_tests)


# A neutralize rule may use every condition (it decides at end of message).
NEU_TESTED = (TESTED.replace("ratelimit: exempt, auth: tag, neutralize: pass, attachments: pass",
                             "neutralize: neutralize")
              .replace("{ratelimit: {action: exempt}}", "{neutralize: {action: neutralize}}"))


POLICY_PROBES: dict[str, Probe] = {
    # -- the policy's own keys: rules, defaults, tests ---------------------------------------
    "policy_version": Probe("", "policy_version: 2\n", decision("ratelimit")),  # refused
    "internal_networks": Probe(*swap(RL, "internal_networks: [127.0.0.0/8]",
                                     "internal_networks: [198.51.100.0/24]"),
                               ratelimit(sessions=5)),
    "defaults.ratelimit": Probe("", "defaults: {ratelimit: exempt}\n", decision("ratelimit")),
    "defaults.auth": Probe("", "defaults: {auth: tag}\n", decision("auth")),
    "defaults.neutralize": Probe("", "defaults: {neutralize: neutralize}\n",
                                 neutralize()),
    "defaults.neutralize.links": Probe("defaults: {neutralize: neutralize}\n",
                                       "defaults: {neutralize: {links: keep}}\n", neutralize()),
    "defaults.neutralize.html": Probe("defaults: {neutralize: neutralize}\n",
                                      "defaults: {neutralize: {html: to_text}}\n", neutralize()),
    "defaults.neutralize.attachments": Probe("defaults: {neutralize: neutralize}\n",
                                             "defaults: {neutralize: {attachments: drop}}\n",
                                             neutralize()),
    "defaults.neutralize.encrypted": Probe(
        "defaults: {neutralize: neutralize}\n", "defaults: {neutralize: {encrypted: drop}}\n",
        neutralize(raw=ZIP_MAIL)),
    "defaults.attachments": Probe("internal_networks: [10.0.0.0/8]\n",
                                  "internal_networks: [10.0.0.0/8]\n"
                                  "defaults: {attachments: delete}\n", attachments()),
    "rules[].name": Probe(*swap(RULE, "name: r", "name: s"), decision("ratelimit")),
    "rules[].when.direction": Probe(*swap(RULE, "when: {}", "when: {direction: outbound}"),
                                    decision("ratelimit")),
    "rules[].when.client_ip": Probe(*swap(RULE, "when: {}", "when: {client_ip: [10.0.0.0/8]}"),
                                    decision("ratelimit")),
    "rules[].when.sender": Probe(*swap(RULE, "when: {}", "when: {sender: ['@other.example']}"),
                                 decision("ratelimit")),
    "rules[].when.recipient": Probe(*swap(AUTH_RULE, "when: {}",
                                          "when: {recipient: ['@other.example']}"),
                                    decision("auth")),
    "rules[].when.authenticated": Probe(*swap(RULE, "when: {}", "when: {authenticated: true}"),
                                        decision("ratelimit")),
    "rules[].when.auth": Probe(*swap(NEU_BASE, "when: {}", "when: {auth: {dmarc: [fail]}}"),
                               decision("neutralize", auth={"dmarc": "pass"})),
    "rules[].when.subject": Probe(*swap(AUTH_RULE, "when: {}", "when: {subject: [invoice]}"),
                                  decision("auth", subject="Hello")),
    "rules[].then.ratelimit": Probe(*swap(RULE, "ratelimit: exempt", "ratelimit: enforce"),
                                    decision("ratelimit")),
    "rules[].then.auth": Probe(*swap(RULE, "ratelimit: exempt", "ratelimit: exempt, auth: tag"),
                               decision("auth")),
    "rules[].then.neutralize": Probe(*swap(RULE, "ratelimit: exempt", "neutralize: neutralize"),
                                     neutralize()),
    "rules[].then.neutralize.links": Probe(*swap(NEU_BASE, "neutralize: neutralize",
                                                 "neutralize: {links: keep}"), neutralize()),
    "rules[].then.neutralize.html": Probe(*swap(NEU_BASE, "neutralize: neutralize",
                                                "neutralize: {html: keep}"), neutralize()),
    "rules[].then.neutralize.attachments": Probe(*swap(NEU_BASE, "neutralize: neutralize",
                                                       "neutralize: {attachments: drop}"),
                                                 neutralize()),
    "rules[].then.neutralize.encrypted": Probe(
        *swap(NEU_BASE, "neutralize: neutralize", "neutralize: {encrypted: drop}"),
        neutralize(raw=ZIP_MAIL)),
    "rules[].then.attachments": Probe(*swap(ATT_BASE, "attachments: encrypt",
                                            "attachments: delete"), attachments()),
    "tests[].name": policy_test_probe("name: t", "name: renamed"),
    "tests[].message.client_ip": policy_test_probe("client_ip: 192.0.2.1",
                                                   "client_ip: 203.0.113.1"),
    "tests[].message.mail_from": Probe(
        *swap(TESTED.replace("client_ip: [192.0.2.0/24]", "sender: ['@a.example']"),
              "message: {", "message: {mail_from: x@a.example, "), policy_tests),
    "tests[].message.rcpt": Probe(
        *swap(NEU_TESTED.replace("client_ip: [192.0.2.0/24]", "recipient: ['@example.jp']"),
              "rcpt: [u@example.jp]", "rcpt: [u@other.example]"), policy_tests),
    "tests[].message.auth_user": Probe(
        *swap(TESTED.replace("client_ip: [192.0.2.0/24]", "authenticated: true"),
              "message: {", "message: {auth_user: taro, "), policy_tests),
    "tests[].message.subject": Probe(
        *swap(NEU_TESTED.replace("client_ip: [192.0.2.0/24]", "subject: [invoice]"),
              "message: {", "message: {subject: Invoice due, "), policy_tests),
    "tests[].message.auth": Probe(
        *swap(NEU_TESTED.replace("client_ip: [192.0.2.0/24]", "auth: {dmarc: [fail]}"),
              "message: {", "message: {auth: {dmarc: fail}, "), policy_tests),
    "tests[].repeat": Probe(
        *swap("ratelimit:\n  limits: [{name: l, key: client_ip, per: message, rate: 1/hour, "
              "burst: 2}]\n" + TESTED.replace("ratelimit: exempt, ", "")
              .replace("{ratelimit: {action: exempt}}", "{ratelimit: {reply: '250'}}"),
              "expect:", "repeat: 3\n    expect:"), policy_tests),
    "tests[].expect.ratelimit.action": policy_test_probe("{ratelimit: {action: exempt}}",
                                              "{ratelimit: {action: enforce}}"),
    "tests[].expect.ratelimit.rule": policy_test_probe("{ratelimit: {action: exempt}}",
                                            "{ratelimit: {rule: '(defaults)'}}"),
    "tests[].expect.ratelimit.reply": policy_test_probe("{ratelimit: {action: exempt}}",
                                             "{ratelimit: {reply: '451'}}"),
    "tests[].expect.auth.action": policy_test_probe("{ratelimit: {action: exempt}}",
                                         "{auth: {action: enforce}}"),
    "tests[].expect.auth.rule": policy_test_probe("{ratelimit: {action: exempt}}",
                                       "{auth: {rule: '(defaults)'}}"),
    "tests[].expect.neutralize.action": policy_test_probe("{ratelimit: {action: exempt}}",
                                               "{neutralize: {action: neutralize}}"),
    "tests[].expect.neutralize.rule": policy_test_probe("{ratelimit: {action: exempt}}",
                                             "{neutralize: {rule: '(defaults)'}}"),
    "tests[].expect.attachments.action": policy_test_probe("{ratelimit: {action: exempt}}",
                                                "{attachments: {action: encrypt}}"),
    "tests[].expect.attachments.rule": policy_test_probe("{ratelimit: {action: exempt}}",
                                              "{attachments: {rule: '(defaults)'}}"),

    # -- ratelimit ----------------------------------------------------------------------------
    "ratelimit.exempt_internal": rl("exempt_internal: false",
                                    ratelimit(sessions=5, client="127.0.0.1")),
    "ratelimit.allowlist": rl("allowlist: [198.51.100.0/24]", ratelimit(sessions=5)),
    "ratelimit.limits[].name": Probe(*swap(RL, "name: per-ip", "name: per-address"),
                                     lambda pol: [l.name for l in
                                                  pol.sections["ratelimit"].limits_per("message")]),
    "ratelimit.limits[].key": Probe(*swap(RL, "key: client_ip", "key: sender"),
                                    ratelimit(sessions=5, vary_sender=True)),
    "ratelimit.limits[].per": Probe(*swap(RL, "per: message", "per: recipient"),
                                    ratelimit(sessions=2, rcpts=2)),
    "ratelimit.limits[].rate": Probe(*swap(RL, "rate: 6/min", "rate: 60/min"),
                                     ratelimit(sessions=6, wait=5.0)),
    "ratelimit.limits[].burst": Probe(*swap(RL, "burst: 3", "burst: 10"),
                                      ratelimit(sessions=5)),
    "ratelimit.reply": rl("reply: '450 4.7.1 Slow down, please'", ratelimit(sessions=5)),
    "ratelimit.blocked_reply": Probe(
        RL + "  points: {tempfail_at: 5, rejected_recipient: 10}\n",
        RL + "  points: {tempfail_at: 5, rejected_recipient: 10}\n"
             "  blocked_reply: '554 5.7.1 Go away'\n", ratelimit(sessions=3, rejected=1)),
    "ratelimit.points.half_life": Probe(
        RL + "  points: {tempfail_at: 5, rejected_recipient: 4, half_life: 1h}\n",
        RL + "  points: {tempfail_at: 5, rejected_recipient: 4, half_life: 1m}\n",
        ratelimit(sessions=3, rejected=1, wait=120.0)),
    "ratelimit.points.halve_rate_every": Probe(
        RL + "  points: {rejected_recipient: 4, halve_rate_every: 1000}\n",
        RL + "  points: {rejected_recipient: 4, halve_rate_every: 1}\n",
        ratelimit(sessions=4, rejected=1, wait=12.0)),
    "ratelimit.points.tempfail_at": Probe(
        RL + "  points: {rejected_recipient: 4}\n",
        RL + "  points: {rejected_recipient: 4, tempfail_at: 5}\n",
        ratelimit(sessions=3, rejected=1)),
    "ratelimit.points.rejected_recipient": Probe(
        RL + "  points: {tempfail_at: 5}\n",
        RL + "  points: {tempfail_at: 5, rejected_recipient: 10}\n",
        ratelimit(sessions=3, rejected=1)),
    "ratelimit.points.too_many_recipients.over": Probe(
        RL + "  points: {tempfail_at: 5, too_many_recipients: {points: 10}}\n",
        RL + "  points: {tempfail_at: 5, too_many_recipients: {points: 10, over: 2}}\n",
        ratelimit(sessions=3, rcpts=3)),
    "ratelimit.points.too_many_recipients.points": Probe(
        RL + "  points: {tempfail_at: 5, too_many_recipients: {over: 2, points: 1}}\n",
        RL + "  points: {tempfail_at: 5, too_many_recipients: {over: 2, points: 10}}\n",
        ratelimit(sessions=3, rcpts=3)),
    "ratelimit.points.connection_without_mail": Probe(
        RL + "  points: {tempfail_at: 5}\n",
        RL + "  points: {tempfail_at: 5, connection_without_mail: 10}\n",
        ratelimit(sessions=3, without_mail_first=2)),
    "ratelimit.points.bad_networks.points": Probe(
        RL + "  points: {tempfail_at: 5, bad_networks: {networks: [198.51.100.0/24], "
             "points: 1}}\n",
        RL + "  points: {tempfail_at: 5, bad_networks: {networks: [198.51.100.0/24], "
             "points: 10}}\n", ratelimit(sessions=3)),
    "ratelimit.points.bad_networks.networks": Probe(
        RL + "  points: {tempfail_at: 5, bad_networks: {points: 10}}\n",
        RL + "  points: {tempfail_at: 5, bad_networks: {points: 10, "
             "networks: [198.51.100.0/24]}}\n", ratelimit(sessions=3)),
    "ratelimit.points.auth_results": Probe(
        RL + "  points: {tempfail_at: 5}\n",
        RL + "  points: {tempfail_at: 5, auth_results: {dmarc=fail: 10}}\n",
        ratelimit(sessions=3, auth_results=[("dmarc", "fail")])),
    "ratelimit.on_store_failure": rl("on_store_failure: local",
                                     ratelimit(sessions=2, store_down=True)),
    "ratelimit.store_failure_reply": rl("store_failure_reply: '451 4.3.0 Store down, later'",
                                        ratelimit(sessions=2, store_down=True)),

    # -- auth ---------------------------------------------------------------------------------
    "auth.internal": auth("{internal: enforce}", auth_verdict(
        lambda: auth_message(client="127.0.0.1"))),
    "auth.authenticated": auth("{authenticated: enforce}", auth_verdict(
        lambda: auth_message(auth_user="taro"))),
    "auth.on_bad_from": auth("{on_bad_from: reject}", auth_verdict(
        lambda: auth_message(from_line=None))),
    "auth.bad_from_reply": Probe(AUTH_BASE + "auth: {on_bad_from: reject}\n",
                                 AUTH_BASE + "auth: {on_bad_from: reject, bad_from_reply: "
                                             "'550 5.7.1 One From, please'}\n",
                                 auth_verdict(lambda: auth_message(from_line=None))),
    "auth.on_temperror": auth("{on_temperror: tag}", auth_verdict(
        lambda: auth_message(from_line="a <a@slow.test>"))),
    "auth.temperror_reply": auth("{temperror_reply: '451 4.4.3 DNS is slow'}", auth_verdict(
        lambda: auth_message(from_line="a <a@slow.test>"))),
    "auth.dmarc.actions.reject": auth("{dmarc: {actions: {reject: tag}}}"),
    "auth.dmarc.actions.quarantine": auth("{dmarc: {actions: {quarantine: reject}}}",
                                          auth_verdict(lambda: auth_message(
                                              "b <b@quarantine.test>"))),
    "auth.dmarc.actions.none": auth("{dmarc: {actions: {none: reject}}}", auth_verdict(
        lambda: auth_message("n <n@none.test>"))),
    "auth.dmarc.domains.*.reject": auth("{dmarc: {domains: {reject.test: {reject: tag}}}}"),
    "auth.dmarc.domains.*.quarantine": auth(
        "{dmarc: {domains: {quarantine.test: {quarantine: reject}}}}",
        auth_verdict(lambda: auth_message("b <b@quarantine.test>"))),
    "auth.dmarc.domains.*.none": auth("{dmarc: {domains: {none.test: {none: reject}}}}",
                                      auth_verdict(lambda: auth_message("n <n@none.test>"))),
    "auth.dmarc.reject_reply": auth("{dmarc: {reject_reply: '550 5.7.1 Not from you'}}"),
    "auth.reports.record": auth("{reports: {record: true}}"),
    "auth.spf.check_helo": auth("{spf: {check_helo: false}}"),
    "auth.spf.lookup_limit": auth("{spf: {lookup_limit: 1}}", auth_verdict(zone=SPF_ZONE)),
    "auth.spf.void_lookup_limit": auth("{spf: {void_lookup_limit: 0}}",
                                       auth_verdict(zone=SPF_ZONE)),
    "auth.dmarc.honour_pct": auth("{dmarc: {honour_pct: false}}", auth_verdict(
        lambda: auth_message("p <p@pct.test>"), zone=PCT_ZONE)),
}

POLICY_PROBES.update({
    # -- neutralize (the decisions that need no converter) -------------------------------------
    "neutralize.skip_internal": neu("{skip_internal: false}", neutralize(client="127.0.0.1")),
    "neutralize.skip_authenticated": neu("{skip_authenticated: false}",
                                         neutralize(auth_user="taro")),
    "neutralize.trusted_domains": neu("{trusted_domains: [bank.example]}",
                                      neutralize(dmarc_pass_for="bank.example")),
    "neutralize.links": neu("{links: keep}"),
    "neutralize.html": neu("{html: to_text}"),
    "neutralize.attachments": neu("{attachments: drop}"),
    "neutralize.encrypted": neu("{encrypted: drop}", neutralize(
        raw=ZIP_MAIL)),
    "neutralize.encrypted_reply": neu("{encrypted_reply: '550 5.7.1 No locked files'}",
                                      neutralize(raw=ZIP_MAIL)),
    "neutralize.convert[].match": Probe(
        NEU_BASE + "neutralize: {convert: [{match: [.pdf], action: keep}]}\n",
        NEU_BASE + "neutralize: {convert: [{match: [.txt], action: keep}]}\n", neutralize()),
    "neutralize.convert[].action": Probe(
        NEU_BASE + "neutralize: {convert: [{match: [.txt], action: keep}]}\n",
        NEU_BASE + "neutralize: {convert: [{match: [.txt], action: drop}]}\n", neutralize()),
    "neutralize.language": neu("{language: ja}"),
    "neutralize.limits.attachment_size": neu("{limits: {attachment_size: 1024}}", neutralize(
        raw=HTML_MAIL.replace(b"plain notes", b"x" * 2000))),

    # -- attachments --------------------------------------------------------------------------
    "attachments.only_internal_senders": att("{only_internal_senders: false}",
                                             attachments(client="198.51.100.7"),
                                             base=ATT_BASE.replace("direction: outbound, ", "")),
    "attachments.pass_clients": att("{pass_clients: [10.1.0.0/16]}"),
    "attachments.subject_keyword": att("{subject_keyword: 見積}",
                                       attachments(rcpts=("taro@example.jp",))),
    "attachments.inline_images": att("{inline_images: true}", attachments(
        raw=(ROOT / "samples" / "attach-html-inline.eml").read_bytes())),
    "attachments.encrypt.encryption": att("{encrypt: {encryption: aes256}}"),
    "attachments.encrypt.names": att("{encrypt: {names: utf-8}}"),
    "attachments.encrypt.zip_name": att("{encrypt: {zip_name: 'Files-%Y.zip'}}"),
    # An emoji has no CP932 form: the entry gets the alias instead.
    "attachments.encrypt.alias": att("{encrypt: {alias: 'file{n}{ext}'}}", attachments(
        raw=mail_with("\U0001F600.txt", 100))),
    "attachments.encrypt.password.length": att("{encrypt: {password: {length: 30}}}",
                                               lambda pol: len(_notice_password(pol))),
    "attachments.encrypt.password.alphabet": att("{encrypt: {password: {alphabet: '7'}}}",
                                                 lambda pol: set(_notice_password(pol)) == {"7"}),
    "attachments.encrypt.password.exclude_ambiguous": Probe(
        ATT_BASE + "attachments: {encrypt: {password: {alphabet: 'l1O0', length: 40}}}\n",
        ATT_BASE + "attachments: {encrypt: {password: {alphabet: 'l1O0', length: 40, "
                   "exclude_ambiguous: false}}}\n", lambda pol: _notice_password(pol)),
    "attachments.notice.to": att("{notice: {to: recipients}}"),
    "attachments.notice.language": att("{notice: {language: en}}"),
    "attachments.notice.sender": att("{notice: {sender: notices@example.jp}}"),
    "attachments.notice.log_password": att("{notice: {log_password: true}}",
                                           lambda pol: _logged(pol)),
    "attachments.offload.on_failure": Probe(
        ATT_BASE.replace("encrypt}", "offload}") + "attachments: {offload: {nextcloud: "
        "{url: 'https://127.0.0.1:1', user: u, password_env: MM_PROBE_NC, retries: 0, "
        "timeout: 1s}}}\n",
        ATT_BASE.replace("encrypt}", "offload}") + "attachments: {offload: {on_failure: "
        "encrypt, nextcloud: {url: 'https://127.0.0.1:1', user: u, password_env: "
        "MM_PROBE_NC, retries: 0, timeout: 1s}}}\n", attachments()),
    "attachments.max_total_size": att("{max_total_size: 4096}", attachments(
        raw=mail_with("big.bin", 5000))),
    "attachments.reinject_timeout": att("{reinject_timeout: 5s}"),
    # A multipart without its closing delimiter: whole into the ZIP, or tempfailed.
    "attachments.on_unparsable": att("{on_unparsable: tempfail}", attachments(
        raw=b"From: hanako@example.jp\r\nTo: buyer@customer.example\r\nSubject: x\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\n"
            b"Content-Type: application/octet-stream; name=a.bin\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n")),
})


# -- review -----------------------------------------------------------------------------------
REV_BASE = """\
internal_networks: [10.0.0.0/8]
own_domains: [example.jp]
rules:
  - name: r
    when: {direction: outbound}
    then: {review: {delay: 5m}}
"""
REV_APPROVE = REV_BASE.replace("{delay: 5m}", "{approve: {approvers: [boss@example.jp]}}")
REV_ESCALATE = REV_BASE.replace("{delay: 5m}", "{approve: {approvers: [boss@example.jp], "
                                "on_timeout: escalate, escalate_to: [cio@example.jp]}}")
REV_DEFAULTS = "internal_networks: [10.0.0.0/8]\ndefaults: {review: {delay: 5m}}\n"
REV_TESTED = """\
internal_networks: [10.0.0.0/8]
rules:
  - name: r
    when: {attachments: true, size: {over: 1MB}}
    then: {review: {delay: 5m}}
tests:
  - name: t
    message: {client_ip: 10.1.0.5, mail_from: a@example.jp, rcpt: [u@example.jp], size: 2MB}
    expect: {review: {action: delay}}
"""


def _review_mail() -> bytes:
    from email.message import EmailMessage
    msg = EmailMessage()
    msg["From"], msg["Subject"] = "hanako@example.jp", "probe"
    msg.set_content("hello")
    msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="a.pdf")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def review(rcpts: tuple[str, ...] = ("buyer@customer.example",), client: str = "10.1.0.5",
           sender: str = "hanako@example.jp") -> Observer:
    """The review milter's verdict, its record (ID left out) and the notices and links it
    gives, over the stand-in book."""
    from milters.review.logic import ReviewChecker
    from tests.harness.review_standin import Standin

    def observe(pol: Policy) -> object:
        standin, sent = Standin(), []

        def send(listen: str, mail_from: str, to: list[str], data: bytes,
                 timeout: float) -> str:
            sent.append((mail_from, to, data, timeout))
            return "250 ok"
        checker = ReviewChecker("mx.example.jp", "127.0.0.1:10026", standin.kit(),
                                clock=lambda: 1e9, send=send)
        result = checker.check(Message(raw=_review_mail(), envelope=env(
            client=client, sender=sender, rcpts=rcpts)), pol)
        records = [{**vars(r), "id": ""} for r in standin.book.records.values()]
        ids = [r.id for r in standin.book.records.values()]

        def scrub(text: str) -> str:
            for review_id in ids:
                text = text.replace(review_id, "ID")
            return text
        return (result.verdict.action, [scrub(repr(e)) for e in result.edits], records,
                [(f, t, scrub(d.decode()), timeout) for f, t, d, timeout in sent],
                [(p, a, e) for _, p, a, e in standin.links])
    return observe


POLICY_PROBES.update({
    "own_domains": Probe(*swap(REV_BASE.replace("direction: outbound",
                                                "outside_recipients: true"),
                               "own_domains: [example.jp]",
                               "own_domains: [customer.example]"), review()),
    "rules[].when.outside_recipients": Probe(*swap(REV_BASE, "direction: outbound",
                                                   "outside_recipients: false"), review()),
    "rules[].when.outside_domains.min": Probe(*swap(REV_BASE, "direction: outbound",
                                                    "outside_domains: {min: 2}"),
                                              review()),
    "rules[].when.outside_domains.max": Probe(*swap(REV_BASE, "direction: outbound",
                                                    "outside_domains: {max: 0}"), review()),
    "rules[].when.attachments": Probe(*swap(REV_BASE, "direction: outbound",
                                            "attachments: false"), review()),
    # Without a directory (the stand-in kit has none) a group rule never matches.
    "rules[].when.sender_groups": Probe(*swap(REV_BASE, "direction: outbound",
                                              "sender_groups: [sales]"), review()),
    "rules[].when.size.over": Probe(*swap(REV_BASE, "direction: outbound",
                                          "size: {over: 1MB}"), review()),
    "rules[].when.size.under": Probe(*swap(REV_BASE, "direction: outbound",
                                           "size: {under: 100}"), review()),
    "rules[].then.review": Probe(*swap(REV_BASE, "{review: {delay: 5m}}", "{review: none}"),
                                 review()),
    "rules[].then.review.delay": Probe(*swap(REV_BASE, "delay: 5m", "delay: 1h"), review()),
    "rules[].then.review.confirm": Probe(*swap(REV_BASE, "delay: 5m", "confirm: true"),
                                         review()),
    "rules[].then.review.timeout": Probe(*swap(REV_BASE.replace("delay: 5m", "confirm: true"),
                                               "confirm: true", "confirm: true, timeout: 1h"),
                                         review()),
    "rules[].then.review.approve.approvers": Probe(*swap(REV_APPROVE, "[boss@example.jp]",
                                                         "[cio@example.jp]"), review()),
    "rules[].then.review.approve.self_approval": Probe(*swap(
        REV_APPROVE.replace("[boss@example.jp]", "[hanako@example.jp, boss@example.jp]"),
        "boss@example.jp]}", "boss@example.jp], self_approval: true}"), review()),
    "rules[].then.review.approve.timeout": Probe(*swap(REV_APPROVE, "[boss@example.jp]}",
                                                       "[boss@example.jp], timeout: 1h}"),
                                                 review()),
    "rules[].then.review.approve.on_timeout": Probe(*swap(REV_APPROVE, "[boss@example.jp]}",
                                                          "[boss@example.jp], on_timeout: "
                                                          "send}"), review()),
    "rules[].then.review.approve.escalate_to": Probe(*swap(REV_ESCALATE, "[cio@example.jp]",
                                                           "[ceo@example.jp]"), review()),
    "defaults.review": Probe("internal_networks: [10.0.0.0/8]\n", REV_DEFAULTS, review()),
    "defaults.review.delay": Probe(*swap(REV_DEFAULTS, "delay: 5m", "delay: 1h"), review()),
    "defaults.review.confirm": Probe(*swap(REV_DEFAULTS, "delay: 5m", "confirm: true"),
                                     review()),
    "defaults.review.timeout": Probe(*swap(REV_DEFAULTS, "delay: 5m",
                                           "confirm: true, timeout: 1h"), review()),
    "defaults.review.approve.approvers": Probe(*swap(
        REV_DEFAULTS, "delay: 5m", "approve: {approvers: [boss@example.jp]}"), review()),
    "defaults.review.approve.self_approval": Probe(*swap(
        REV_DEFAULTS.replace("delay: 5m", "approve: {approvers: [hanako@example.jp, "
                                          "boss@example.jp]}"),
        "boss@example.jp]}", "boss@example.jp], self_approval: true}"), review()),
    "defaults.review.approve.timeout": Probe(*swap(
        REV_DEFAULTS.replace("delay: 5m", "approve: {approvers: [boss@example.jp]}"),
        "]}", "], timeout: 1h}"), review()),
    "defaults.review.approve.on_timeout": Probe(*swap(
        REV_DEFAULTS.replace("delay: 5m", "approve: {approvers: [boss@example.jp]}"),
        "]}", "], on_timeout: send}"), review()),
    "defaults.review.approve.escalate_to": Probe(*swap(
        REV_DEFAULTS.replace("delay: 5m", "approve: {approvers: [boss@example.jp], "
                                          "on_timeout: escalate, escalate_to: [a@example.jp]}"),
        "[a@example.jp]", "[b@example.jp]"), review()),
    "review.language": Probe(REV_BASE, REV_BASE + "review: {language: en}\n", review()),
    "review.reinject_timeout": Probe(REV_BASE, REV_BASE + "review: {reinject_timeout: 5s}\n",
                                     review()),
    "tests[].message.attachments": Probe(*swap(REV_TESTED, "size: 2MB",
                                               "size: 2MB, attachments: [a.pdf]"),
                                         policy_tests),
    "tests[].message.size": Probe(*swap(REV_TESTED.replace("mail_from:",
                                                           "attachments: [a.pdf], mail_from:"),
                                        "size: 2MB", "size: 1KB"), policy_tests),
    "tests[].expect.review.action": Probe(*swap(REV_TESTED, "{action: delay}",
                                                "{action: none}"), policy_tests),
    "tests[].expect.review.rule": Probe(*swap(REV_TESTED, "{action: delay}",
                                              "{rule: '(defaults)'}"), policy_tests),
})


def _notice_password(pol: Policy) -> str:
    """The password the notice tells (from the real checker's notice)."""
    import email
    from email import policy as email_policy
    captured: list[bytes] = []

    def send(listen: str, mail_from: str, to: list[str], data: object, timeout: float) -> str:
        captured.append(data if isinstance(data, bytes) else b"".join(data))  # type: ignore
        return "250 2.0.0 Ok"
    checker = AttachmentsChecker("mx.example.jp", "127.0.0.1:10026", clock=lambda: NOW,
                                 send=send)
    checker.check(Message(raw=PPAP, envelope=env(client="10.1.0.5", sender="hanako@example.jp",
                                                 rcpts=("buyer@customer.example",))), pol)
    notice = email.message_from_bytes(captured[-1], policy=email_policy.default)
    text = notice.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    return _password_line(text)


def _logged(pol: Policy) -> object:
    import logging
    lines: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
    handler = Catch()
    logger = logging.getLogger("mailmoat")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        attachments()(pol)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return any("password=" in line for line in lines)


# Files some probes name (secret files 0600, a template directory), made once per run.
FILES = Path(tempfile.mkdtemp(prefix="mailmoat-probes-"))
for _name, _text in (("alpha.pass", "Alpha%Y"), ("beta.pass", "Beta%Y")):
    (FILES / _name).write_text(_text + "\n")
    (FILES / _name).chmod(0o600)
(FILES / "templates").mkdir()
(FILES / "templates" / "password.ja.txt").write_text(
    (ROOT / "milters" / "attachments" / "templates" / "password.ja.txt").read_text(
        encoding="utf-8").replace("パスワード", "合言葉", 1), encoding="utf-8")
FIXED = ("attachments: {encrypt: {password: {fixed: [{recipients: ['@customer.example'], "
         "%s}]}}}\n")
POLICY_PROBES.update({
    "attachments.encrypt.password.fixed[].recipients": Probe(
        ATT_BASE + FIXED % "password_env: MM_PROBE_FIXED_A",
        ATT_BASE + (FIXED % "password_env: MM_PROBE_FIXED_A").replace("@customer.example",
                                                                      "@elsewhere.example"),
        lambda pol: _notice_password(pol) == "Alpha2026"),
    "attachments.encrypt.password.fixed[].password_env": Probe(
        ATT_BASE + FIXED % "password_env: MM_PROBE_FIXED_A",
        ATT_BASE + FIXED % "password_env: MM_PROBE_FIXED_B", _notice_password),
    "attachments.encrypt.password.fixed[].password_file": Probe(
        ATT_BASE + FIXED % f"password_file: {FILES / 'alpha.pass'}",
        ATT_BASE + FIXED % f"password_file: {FILES / 'beta.pass'}", _notice_password),
    "attachments.notice.templates": att(f"{{notice: {{templates: '{FILES / 'templates'}'}}}}"),
})


# -- neutralize converters: real conversions in the real sandbox (bubblewrap, worker) --------
def _conversion_mail(files: list[tuple[str, bytes]]) -> bytes:
    from email import policy as email_policy
    from email.message import EmailMessage
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = ("a@bank.example", "u@example.jp",
                                                          "Documents")
    message["Message-ID"] = "<probe.2@bank.example>"
    message.set_content("See the attached files.\n")
    for name, data in files:
        message.add_attachment(data, maintype="application", subtype="octet-stream",
                               filename=name)
    return message.as_bytes(policy=email_policy.SMTP)


def _made(name: str, make: Callable[[Path], Path]) -> bytes:
    path = FILES / name
    if not path.exists():
        make(path)
    return path.read_bytes()


def _picture(path: Path) -> Path:
    """A 400x300 photo-like PNG (a gradient with noise: JPEG quality shows in its size)."""
    import random
    from PIL import Image
    noise = random.Random(7)
    image = Image.new("RGB", (400, 300))
    image.putdata([(x % 256, (y * 2) % 256, noise.randrange(256))
                   for y in range(300) for x in range(400)])
    image.save(path, "PNG")
    return path


# The attachments converter probes send, by name (more are added further down).
MAKERS: dict[str, Callable[[], bytes]] = {
    "photo.png": lambda: _made("photo.png", _picture),
    "doc.pdf": lambda: _made("doc.pdf", lambda p: docs.pdf(p, 3)),
    "doc.docx": lambda: _made("doc.docx", lambda p: docs.docx(p, ["x"])),
    "cut.png": lambda: _made("cut.png", broken_files.truncated_png)}


def converted(*names: str) -> Observer:
    """What the neutralize milter makes of attachments that need a converter: each part's
    type and name, and for images and PDFs what is inside (format, pixels, bytes, pages,
    page image pixels); notes as text."""
    def observe(pol: Policy, checker: NeutralizeChecker | None = None) -> object:
        """`checker`: one shared by several observations at once (its sandbox's slots
        are the pool of workers of a milter process)."""
        raw = _conversion_mail([(name, MAKERS[name]()) for name in names])
        e = Envelope(client_ip="198.51.100.7", mail_from="a@bank.example",
                     recipients=[Recipient("u@example.jp")], queue_id="4Probe")
        checker = checker or NeutralizeChecker("mx.probe.test")
        result = checker.check(Message(raw=raw, envelope=e), pol)
        head = raw[:raw.index(b"\r\n\r\n") + 2]
        body = None
        for edit in result.edits:
            new = getattr(edit, "body", None)
            if new is not None:
                body = new if isinstance(new, bytes) else new.read()
            elif getattr(edit, "name", "").lower() == "content-type":
                head = _set_field(head, edit.name, edit.value)  # type: ignore[attr-defined]
        if body is None:
            return (result.verdict.action, str(result.verdict.reply), None)
        return (result.verdict.action, str(result.verdict.reply),
                _document_facts(head + b"\r\n" + body))
    return observe


def _document_facts(data: bytes) -> object:
    import email
    import io
    from email import policy as email_policy
    import pikepdf
    from PIL import Image
    facts = []
    message = email.message_from_bytes(data, policy=email_policy.default)
    for part in message.walk():
        if part.is_multipart():
            continue
        name, kind = part.get_filename(), part.get_content_type()
        payload = part.get_payload(decode=True) or b""
        if kind == "text/plain":  # the body, and the note that says what was changed
            facts.append((kind, name, part.get_content().strip()))
        elif payload[:4] == b"%PDF":
            with pikepdf.open(io.BytesIO(payload)) as pdf:
                images = [(int(im.Width), int(im.Height), str(im.get("/Filter")))
                          for page in pdf.pages
                          for im in page.get_images().values()]
                facts.append((kind, name, "pdf", len(pdf.pages), images))
        elif name and name.endswith((".jpg", ".png")):
            image = Image.open(io.BytesIO(payload))
            facts.append((kind, name, image.format, image.size, len(payload) // 1000))
        else:
            facts.append((kind, name, len(payload)))
    return facts


FORK_OFFICE = FILES / "fork-soffice"
FORK_OFFICE.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""\
    import os, sys, time
    children = []
    for n in range(40):  # bounded: far above the probe's limit, harmless if it held
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, 9)
    print(f"forked {len(children)}", file=sys.stderr)
    sys.exit(1)
    """))
FORK_OFFICE.chmod(0o755)


def fake_office(name: str, body: str) -> Path:
    """A program standing where LibreOffice stands (`soffice`): it runs in the same jail
    with the same limits, and what it prints on stderr reaches the note."""
    path = FILES / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


MEMORY_OFFICE = fake_office("memory-soffice", """\
    import sys
    try:
        block = bytearray(400 * 1024 * 1024)
        print("allocated 400 MiB", file=sys.stderr)
    except MemoryError:
        print("no memory for 400 MiB", file=sys.stderr)
    sys.exit(1)
    """)
SLEEP_OFFICE = fake_office("sleep-soffice", """\
    import sys, time
    time.sleep(2.5)
    print("slept 2.5 s", file=sys.stderr)
    sys.exit(1)
    """)
BUSY_OFFICE = fake_office("busy-soffice", """\
    import sys, time
    end = time.process_time() + 2.5
    while time.process_time() < end:
        pass
    print("computed for 2.5 s", file=sys.stderr)
    sys.exit(1)
    """)
CONV_BASE = NEU_BASE + "neutralize:\n  on_failure: drop\n"
FORK_BASE = CONV_BASE + f"  soffice: {FORK_OFFICE}\n"


def conv(setting: str, *names: str, base: str = CONV_BASE,
         observe: Observer | None = None) -> Probe:
    """A converter probe: `setting` is YAML lines under `neutralize:`."""
    return Probe(base, base + textwrap.indent(textwrap.dedent(setting), "  "),
                 observe or converted(*names))


# -- gateway observers: serve's SMTP server, the router and the queue, run for real -----------
# Certificates (tests/harness/certs.py): a private CA, a server certificate for 127.0.0.1,
# a second one on the same key (gateway.tls.cert), and a key that matches neither.
_CA = TestCa(FILES)
CERT, KEY = _CA.issue("server", "IP:127.0.0.1")
OTHER_CERT = FILES / "other.pem"
subprocess.run(["openssl", "req", "-new", "-key", str(KEY), "-subj", "/CN=other",
                "-out", str(FILES / "other.csr")], check=True, capture_output=True, timeout=30)
subprocess.run(["openssl", "x509", "-req", "-in", str(FILES / "other.csr"), "-CA", str(_CA.cert),
                "-CAkey", str(_CA.key), "-CAcreateserial", "-days", "2", "-out", str(OTHER_CERT)],
               check=True, capture_output=True, timeout=30)
OTHER_KEY = _CA.issue("stranger", "IP:127.0.0.1")[1]
USERS = FILES / "users"
set_password(USERS, "taro", "Probe-Pass-2026")
(FILES / "internal-10.yaml").write_text("internal_networks: [10.0.0.0/8]\n")
# serve's policy for the SMTP observers: loopback is NOT internal, so relaying is decided
# by gateway.relay_domains and the client is counted as an outside one.
SMTP_POLICY = load_policy_text("internal_networks: [10.0.0.0/8]\n", EXTENSIONS, "smtp.yaml")

_NEXT_HOP: list[SmtpSink] = []


def next_hop() -> SmtpSink:
    """The loopback next hop the routes name (@SINK@), offering STARTTLS with CERT."""
    if not _NEXT_HOP:
        _NEXT_HOP.append(SmtpSink(tls_context=server_context(CERT, KEY)).start())
    return _NEXT_HOP[0]


@pytest.fixture(scope="module", autouse=True)
def _stop_next_hop() -> Iterator[None]:
    yield
    for sink in _NEXT_HOP:
        sink.stop()
    _NEXT_HOP.clear()


async def _reply(reader: asyncio.StreamReader) -> str:
    lines = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode().rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)


def smtp(*commands: str, connections: int = 1, load_policy: bool = False) -> Observer:
    """What serve's SMTP server (its settings from serve.smtp_settings, on a real loopback
    listener) answers: the greeting of each of `connections` clients, then `commands` on
    the first (STARTTLS is done for real: the reply shows the certificate's subject)."""
    def observe(config: Any) -> object:
        pol = read_policy(config.policy) if load_policy else SMTP_POLICY
        try:
            settings = smtp_settings(config, pol, user_file(config), server_tls(config))
        except (ssl.SSLError, OSError) as exc:  # serve stops at start with this error
            return ("refused at start", type(exc).__name__)

        async def run() -> list[str]:
            handler = GatewayHandler(settings, Queue(_CONFIG_DIR[0] / "smtp-spool"))
            server = await start_listener(handler, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            clients, replies = [], []
            try:
                for _ in range(connections):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    clients.append((reader, writer))
                    replies.append(await _reply(reader))
                reader, writer = clients[0]
                for line in commands:
                    writer.write(line.encode() + b"\r\n")
                    await writer.drain()
                    replies.append(await _reply(reader))
                    if line == "STARTTLS" and replies[-1].startswith("220"):
                        context = ssl.create_default_context(cafile=str(_CA.cert))
                        await writer.start_tls(context)
                        subject = writer.get_extra_info("peercert")["subject"]
                        replies.append(f"TLS with {subject}")
            finally:
                for _, writer in clients:
                    writer.close()
                server.close()
                await server.wait_closed()
            return replies
        return asyncio.run(run())
    return observe


def deadlines(open_connections: int) -> Observer:
    """When the SMTP server's waits end (SmtpConnection.wait_ends, the deadline its timer
    enforces) with `open_connections` clients connected: a command line begun at 0, and a
    DATA begun at 0 whose client sent 5000 bytes, the last at 100 s."""
    def observe(config: Any) -> object:
        settings = smtp_settings(config, SMTP_POLICY, None, None)

        async def run() -> object:
            handler = GatewayHandler(settings, Queue(_CONFIG_DIR[0] / "smtp-spool"))
            for n in range(open_connections):
                handler.admit_connection(f"192.0.2.{n % 250}")
            connection = SmtpConnection(handler)
            return (connection.wait_ends("command", 0.0, 0.0, 0),
                    connection.wait_ends("data", 0.0, 100.0, 5000))
        return asyncio.run(run())
    return observe


def delivered(rcpt: str = "u@example.jp", age: float = 0.0) -> Observer:
    """What delivery does with a message queued `age` seconds ago, through the router
    build_router makes from the config: deliver_one's outcome and next attempt, what the
    next hop got (and over TLS or not), which Maildir boxes got it, where it was queued."""
    def observe(config: Any) -> object:
        home = _CONFIG_DIR[0]
        before = {p for p in home.rglob("*") if p.is_file()}
        hop = next_hop()
        seen = len(hop.messages)
        queue = Queue(config.queue.dir)
        now = time.time()
        envelope = QueuedEnvelope(new_queue_id(), "a@sender.example", [RecipientState(rcpt)],
                                  received_at=now - age)
        queue.enqueue(b"From: a@sender.example\r\nSubject: probe\r\n\r\nHello.\r\n", envelope)
        deliver_one(queue, envelope, build_router(config), config.queue, config.hostname, now)
        states = [(r.status, (r.last_reply or "")[:5]) for r in envelope.recipients]
        new = sorted({str(p.relative_to(home).parent) for p in home.rglob("*")
                      if p.is_file() and p not in before and "/new" in str(p)})
        queued = sorted({str(p.relative_to(home).parents[1]) for p in home.rglob("*")
                         if p.is_file() and p not in before and "/active" in str(p)})
        wait = round(envelope.next_attempt - now) if envelope.pending() else None
        return (states, wait, [m.tls for m in hop.messages[seen:]], new, queued)
    return observe


def delivery_nice(config: Any) -> object:
    """The nice value the real delivery process (`mailmoat deliver`, as serve starts it)
    runs at, read from /proc once it has made its queue directory."""
    spool = Path(config.queue.dir)
    shutil.rmtree(spool, ignore_errors=True)
    process = DeliveryProcess(config.source)
    try:
        deadline = time.monotonic() + 30
        while not (spool / "active").exists():
            assert process.alive() and time.monotonic() < deadline, "deliver did not start"
            time.sleep(0.05)
        stat = Path(f"/proc/{process.process.pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[16])  # field 19: nice
    finally:
        process.stop()


def run_as(config: Any) -> object:
    """Whom serve becomes after binding its ports (privileges.plan; serve runs as root in
    the test suite, as it is started on port 25)."""
    try:
        return privileges.plan(config)
    except MailmoatError as exc:
        return ("refused", str(exc).partition(": ")[2])


SINK_ROUTE = "smtp:[127.0.0.1]:@SINK@"
CA_FILE = str(_CA.cert)


GATEWAY_PROBES: dict[str, Probe] = {
    "store": Probe("store: memory://\n", "store: sqlite:///state.db\n", store_opened),
    "store_timeout": Probe("store: sqlite:///state.db\n",
                           "store: sqlite:///state.db\nstore_timeout: 9s\n", store_opened),
    "store_password_env": Probe("store: redis://127.0.0.1:1/0\n",
                                "store: redis://127.0.0.1:1/0\nstore_password_env: "
                                "MM_PROBE_PW\n", store_opened),
    "store_password_file": Probe("store: redis://127.0.0.1:1/0\n",
                                 "store: redis://127.0.0.1:1/0\nstore_password_file: "
                                 "probe.pass\n", store_opened),
    "milters[].name": Probe("milters: [{name: ratelimit}]\n", "milters: [{name: auth}]\n",
                            chain_members),
    "milters[].socket": Probe("milters: [{name: ratelimit}]\n",
                              "milters: [{name: ratelimit, socket: 'inet:127.0.0.1:8891'}]\n",
                              chain_members),
    "milters[].on_failure": Probe("milters: [{name: ratelimit}]\n",
                                  "milters: [{name: ratelimit, on_failure: accept}]\n",
                                  chain_members),
    "milters[].reuse_connection": Probe("milters: [{name: ratelimit}]\n",
                                        "milters: [{name: ratelimit, reuse_connection: false}]\n",
                                        chain_members),
    "gateway.run_dir": Probe("milters: [{name: ratelimit}]\n",
                             "milters: [{name: ratelimit}]\ngateway: {run_dir: other/run}\n",
                             chain_members),
    "dns.nameservers": Probe("", "dns: {nameservers: [127.0.0.1:5353]}\n",
                             lambda c: (Resolver(c.dns)._resolver.nameservers,
                                        Resolver(c.dns)._resolver.port)),
    "dns.timeout": Probe("dns: {nameservers: [127.0.0.1:5353]}\n",
                         "dns: {nameservers: [127.0.0.1:5353], timeout: 9s}\n",
                         lambda c: Resolver(c.dns)._resolver.lifetime),
}

RELAY = "gateway: {relay_domains: [example.jp]}\n"
EHLO, FROM = "EHLO client.example", "MAIL FROM:<a@sender.example>"


def relay_probe(before: str, after: str, observe: Observer | None = None) -> Probe:
    """Two `gateway: {relay: ...}` settings (flow mappings)."""
    return Probe(f"gateway: {{relay: {before}}}\n", f"gateway: {{relay: {after}}}\n",
                 observe or delivered())


def route_probe(before: str, after: str) -> Probe:
    """Two routes for example.jp (the default stays the Maildir)."""
    return relay_probe(f"{{routes: {{example.jp: {before}}}}}",
                       f"{{routes: {{example.jp: {after}}}}}")


GATEWAY_PROBES.update({
    # -- serve's SMTP server: its settings are serve.smtp_settings(config, ...) --------------
    "gateway.hostname": Probe("", "gateway: {hostname: mx.probe.example}\n", smtp(EHLO)),
    "gateway.relay_domains": Probe("", RELAY, smtp(EHLO, FROM, "RCPT TO:<u@example.jp>")),
    "gateway.max_message_size": Probe("", "gateway: {max_message_size: 2000}\n",
                                      smtp(EHLO, FROM + " SIZE=5000")),
    "gateway.max_recipients": Probe(RELAY, "gateway: {relay_domains: [example.jp], "
                                           "max_recipients: 1}\n",
                                    smtp(EHLO, FROM, "RCPT TO:<u@example.jp>",
                                         "RCPT TO:<v@example.jp>")),
    "gateway.max_connections": Probe("", "gateway: {max_connections: 2}\n",
                                     smtp(connections=3)),
    "gateway.max_connections_per_ip": Probe("", "gateway: {max_connections_per_ip: 2}\n",
                                            smtp(connections=3)),
    "gateway.valid_recipients": Probe(RELAY, "gateway: {relay_domains: [example.jp], "
                                             "valid_recipients: [taro@example.jp]}\n",
                                      smtp(EHLO, FROM, "RCPT TO:<u@example.jp>")),
    "gateway.xclient_hosts": Probe("", "gateway: {xclient_hosts: [127.0.0.0/8]}\n",
                                   smtp(EHLO, "XCLIENT ADDR=192.0.2.1")),
    "gateway.tls.cert": Probe(f"gateway: {{tls: {{cert: {CERT}, key: {KEY}}}}}\n",
                              f"gateway: {{tls: {{cert: {OTHER_CERT}, key: {KEY}}}}}\n",
                              smtp(EHLO, "STARTTLS")),
    # A key that is not the certificate's: serve refuses to start (no silent plain text).
    "gateway.tls.key": Probe(f"gateway: {{tls: {{cert: {CERT}, key: {KEY}}}}}\n",
                             f"gateway: {{tls: {{cert: {CERT}, key: {OTHER_KEY}}}}}\n",
                             smtp(EHLO, "STARTTLS")),
    "gateway.auth.users_file": Probe(
        "", f"gateway: {{auth: {{users_file: {USERS}}}}}\n",
        smtp(EHLO, "AUTH PLAIN " + base64.b64encode(b"\0taro\0Probe-Pass-2026").decode())),
    # serve's policy (read_policy(config.policy)) says who is internal, and so may relay.
    "policy": Probe("", f"policy: {FILES / 'internal-10.yaml'}\n",
                    smtp(EHLO, FROM, "RCPT TO:<u@elsewhere.example>", load_policy=True)),
    # -- the SMTP client deadlines (SmtpConnection.wait_ends, with 170 of 200 clients on) --
    "gateway.smtpd_timeout": Probe("", "gateway: {smtpd_timeout: 60s}\n", deadlines(1)),
    "gateway.smtpd_stress_timeout": Probe("", "gateway: {smtpd_stress_timeout: 30s}\n",
                                          deadlines(170)),
    "gateway.smtpd_min_data_rate": Probe("", "gateway: {smtpd_min_data_rate: 100}\n",
                                         deadlines(1)),
    "gateway.smtpd_stress_share": Probe("", "gateway: {smtpd_stress_share: 0.9}\n",
                                        deadlines(170)),
    # -- privileges: whom serve (root) becomes after binding ---------------------------------
    "gateway.user": Probe("", "gateway: {user: nobody}\n", run_as),
    "gateway.group": Probe("gateway: {user: nobody}\n",
                           "gateway: {user: nobody, group: root}\n", run_as),
    # -- delivery: the router (build_router), deliver_one, the queue -------------------------
    "gateway.relay.default": relay_probe("{}", f"{{default: '{SINK_ROUTE}'}}"),
    "gateway.relay.default.target": relay_probe("{default: {target: 'maildir:box-a'}}",
                                                "{default: {target: 'maildir:box-b'}}"),
    "gateway.relay.default.tls": relay_probe(f"{{default: {{target: '{SINK_ROUTE}'}}}}",
                                             f"{{default: {{target: '{SINK_ROUTE}', "
                                             f"tls: none}}}}"),
    # verify without ca_file: the system CAs do not know our CA, the mail is deferred
    "gateway.relay.default.ca_file": relay_probe(
        f"{{default: {{target: '{SINK_ROUTE}', tls: verify}}}}",
        f"{{default: {{target: '{SINK_ROUTE}', tls: verify, ca_file: {CA_FILE}}}}}"),
    "gateway.relay.routes.*": relay_probe(f"{{routes: {{other.example: '{SINK_ROUTE}'}}}}",
                                          f"{{routes: {{example.jp: '{SINK_ROUTE}'}}}}"),
    "gateway.relay.routes.*.target": route_probe("{target: 'maildir:box-a'}",
                                                 "{target: 'maildir:box-b'}"),
    "gateway.relay.routes.*.tls": route_probe(f"{{target: '{SINK_ROUTE}'}}",
                                              f"{{target: '{SINK_ROUTE}', tls: none}}"),
    "gateway.relay.routes.*.ca_file": route_probe(
        f"{{target: '{SINK_ROUTE}', tls: verify}}",
        f"{{target: '{SINK_ROUTE}', tls: verify, ca_file: {CA_FILE}}}"),
    "gateway.queue.dir": Probe(*swap("gateway: {relay: {default: 'smtp:[127.0.0.1]:1'}}\n",
                                     "}}\n", "}, queue: {dir: other-spool}}\n"), delivered()),
    # two days old: within the default max_age (5 days), past 1 day
    "gateway.queue.max_age": Probe(*swap("gateway: {relay: {default: 'smtp:[127.0.0.1]:1'}}\n",
                                         "}}\n", "}, queue: {max_age: 1d}}\n"),
                                   delivered(age=2 * 86400.0)),
    "gateway.queue.retry": Probe(*swap("gateway: {relay: {default: 'smtp:[127.0.0.1]:1'}}\n",
                                       "}}\n", "}, queue: {retry: [7m]}}\n"), delivered()),
    "gateway.queue.delivery_nice": Probe("gateway: {queue: {dir: nice-spool}}\n",
                                         "gateway: {queue: {dir: nice-spool, "
                                         "delivery_nice: 0}}\n", delivery_nice),
    # -- the milter chain serve builds (MilterSupervisor.members -> MilterEndpoint) ----------
    "milters[].connect_timeout": Probe("milters: [{name: ratelimit}]\n",
                                       "milters: [{name: ratelimit, connect_timeout: 1s}]\n",
                                       chain_members),
    "milters[].command_timeout": Probe("milters: [{name: ratelimit}]\n",
                                       "milters: [{name: ratelimit, command_timeout: 5s}]\n",
                                       chain_members),
    "milters[].content_timeout": Probe("milters: [{name: ratelimit}]\n",
                                       "milters: [{name: ratelimit, content_timeout: 60s}]\n",
                                       chain_members),
})

POLICY_PROBES.update({
    "neutralize.limits.processes": conv("limits: {processes: 16}\n", "doc.docx",
                                        base=FORK_BASE),
    "neutralize.image_format": conv("image_format: jpeg\n", "photo.png"),
    "neutralize.jpeg_quality": conv("jpeg_quality: 20\n", "photo.png",
                                    base=CONV_BASE + "  image_format: jpeg\n"),
    "neutralize.limits.image_pixels": conv("limits: {image_pixels: 10000}\n", "photo.png"),
    "neutralize.dpi": conv("dpi: 50\n", "doc.pdf"),
    "neutralize.page_format": conv("page_format: jpeg\n", "doc.pdf"),
    "neutralize.limits.pages": conv("limits: {pages: 2}\n", "doc.pdf"),
    "neutralize.limits.page_pixels": conv("limits: {page_pixels: 10000}\n", "doc.pdf"),
    "neutralize.on_failure": conv("on_failure: reject\n", "photo.png",
                                  base=NEU_BASE + "neutralize:\n  limits: {image_pixels: 10000}\n"),
    "neutralize.failure_reply": conv("failure_reply: '451 4.7.0 Busy converting, later'\n",
                                     "photo.png", base=NEU_BASE + "neutralize:\n  limits: "
                                                                  "{image_pixels: 10000}\n"),
    "neutralize.on_unreadable": conv("on_unreadable: reject\n", "cut.png"),
    "neutralize.unreadable_reply": conv("unreadable_reply: '554 5.6.0 Send it again'\n",
                                        "cut.png", base=CONV_BASE + "  on_unreadable: reject\n"),
    "neutralize.soffice": Probe(FORK_BASE, CONV_BASE + f"  soffice: {MEMORY_OFFICE}\n",
                                converted("doc.docx")),
    "neutralize.limits.memory": conv("limits: {memory: 268435456}\n", "doc.docx",
                                     base=CONV_BASE + f"  soffice: {MEMORY_OFFICE}\n"),
    "neutralize.limits.wall": conv("limits: {wall: 1s}\n", "doc.docx",
                                   base=CONV_BASE + f"  soffice: {SLEEP_OFFICE}\n"),
    "neutralize.limits.cpu": conv("limits: {cpu: 1s}\n", "doc.docx",
                                  base=CONV_BASE + f"  soffice: {BUSY_OFFICE}\n"),
})


# -- auth: signed, sealed and slow messages (keys made here, in-process) ----------------------
@functools.cache
def _rsa_key(bits: int) -> tuple[bytes, str]:
    """An RSA key: its PEM (for dkimpy) and the p= of its DNS record."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


class _ExpiredSigner(dkim.DKIM):
    """dkimpy's signer with t= and x= in the past (its sign() has no expiry parameter):
    the x= tag is signed like any other, as a real signer with a short TTL makes it."""

    def gen_header(self, fields: list[tuple[bytes, bytes]], *args: Any, **kwargs: Any) -> Any:
        fields = [f for f in fields if f[0] not in (b"t", b"x")]
        at = [name for name, _ in fields].index(b"h")
        fields[at:at] = [(b"t", b"1700000000"), (b"x", b"1700003600")]
        return super().gen_header(fields, *args, **kwargs)


# The From domain reject.test publishes p=reject; MAIL FROM's attacker.test is not aligned,
# so DMARC passes only through a DKIM signature of reject.test that the settings accept.
SIGNED_FROM = "reject.test"


@functools.cache
def _signed(kind: str) -> bytes:
    """auth_message() signed by reject.test (selector s1024, a 1024-bit key) in one way."""
    raw = auth_message().raw
    pem = _rsa_key(1024)[0]
    sign = functools.partial(dkim.sign, selector=b"s1024", domain=SIGNED_FROM.encode(),
                             privkey=pem)
    if kind == "plain":
        return sign(raw) + raw
    if kind == "sha1":
        return sign(raw, signature_algorithm=b"rsa-sha1") + raw
    if kind == "partial":  # l= covers "Hello."; a forger appends below it
        return sign(raw, length=True) + raw + b"PS: the account changed, pay to 999-888.\r\n"
    if kind == "expired":
        return _ExpiredSigner(raw).sign(b"s1024", SIGNED_FROM.encode(), pem) + raw
    if kind == "second":  # a signature whose key is gone, above the good one
        good = sign(raw) + raw
        return dkim.sign(good, b"gone", SIGNED_FROM.encode(), pem) + good
    raise ValueError(kind)


SIGNED_ZONE = {**ZONE, (f"s1024._domainkey.{SIGNED_FROM}", "TXT"): [
    txt(f"v=DKIM1; k=rsa; p={_rsa_key(1024)[1]}")]}
SEALER = "fwd.example.com"


@functools.cache
def _sealed() -> bytes:
    """reject.test's message as a mailing list at fwd.example.com relays it: checked there
    (its own Authentication-Results), sealed (ARC i=1), sent on from its own address."""
    original = auth_message(mail_from="list-bounce@attacker.test", extra=(
        f"Authentication-Results: {SEALER}; spf=pass smtp.mailfrom=reject.test;\r\n"
        f"\tdmarc=pass header.from=reject.test\r\n").encode()).raw
    seal = dkim.arc_sign(original, b"arc", SEALER.encode(), _rsa_key(1024)[0],
                         SEALER.encode(), timestamp=int(time.time()))
    assert len(seal) == 3, "dkimpy found no Authentication-Results of the sealer"
    return b"".join(seal) + original


SEALED_ZONE = {**ZONE, (f"arc._domainkey.{SEALER}", "TXT"): [
    txt(f"v=DKIM1; k=rsa; p={_rsa_key(1024)[1]}")]}


def signed_message(raw: Callable[[], bytes]) -> Callable[[], Message]:
    return lambda: Message(raw=raw(), envelope=auth_message().envelope)


def signed(kind: str) -> Observer:
    return auth_verdict(signed_message(lambda: _signed(kind)), zone=SIGNED_ZONE)


class SlowResolver(DictResolver):
    """A DictResolver whose answers for some names come only after a wait, as from a
    nameserver that is slow but answers."""

    def __init__(self, records: dict[tuple[str, str], object],
                 slow: dict[tuple[str, str], float]) -> None:
        super().__init__(records)
        self.slow = slow

    def lookup(self, name: str, rdtype: str) -> list:  # type: ignore[type-arg]
        time.sleep(self.slow.get((name.lower().rstrip("."), rdtype), 0.0))
        return super().lookup(name, rdtype)


def slow_spf(pol: Policy) -> object:
    """The SPF result for MAIL FROM slowspf.test, whose record takes 1.2 s to come and
    needs one more lookup after it (the check's whole time budget is spf.timeout)."""
    zone = {**ZONE, ("slowspf.test", "TXT"): [txt("v=spf1 a:mail.sender.test -all")]}
    resolver = SlowResolver(zone, {("slowspf.test", "TXT"): 1.2})
    checker = AuthChecker("mx.probe.test", resolver, sample=lambda: 0.99, store=MemoryStore())
    result = checker.check(auth_message(mail_from="bounce@slowspf.test"), pol)
    return (result.verdict.action, [getattr(e, "value", "") for e in result.edits])


def kept_reports(pol: Policy) -> object:
    """How many DMARC report tallies the Store still holds 40 days after the message
    (what `mailmoat dmarc report` could still read then)."""
    store = MemoryStore()
    checker = AuthChecker("mx.probe.test", DictResolver(ZONE), sample=lambda: 0.99, store=store)
    checker.check(auth_message(), pol)
    return (len(store.records("")), len(store.records("", now=time.time() + 40 * 86400)))


REPORTING = AUTH_BASE + "auth: {reports: {record: true}}\n"
POLICY_PROBES.update({
    "auth.dkim.min_rsa_bits": auth("{dkim: {min_rsa_bits: 2048}}", signed("plain")),
    "auth.dkim.allow_sha1": auth("{dkim: {allow_sha1: true}}", signed("sha1")),
    "auth.dkim.allow_partial_body": auth("{dkim: {allow_partial_body: true}}",
                                         signed("partial")),
    "auth.dkim.allow_expired": auth("{dkim: {allow_expired: true}}", signed("expired")),
    # Only the first signature (whose key is gone) is checked: the good one below is not.
    "auth.dkim.max_signatures": auth("{dkim: {max_signatures: 1}}", signed("second")),
    "auth.arc_trusted_sealers": auth(f"{{arc_trusted_sealers: [{SEALER}]}}", auth_verdict(
        signed_message(_sealed), zone=SEALED_ZONE)),
    "auth.spf.timeout": auth("{spf: {timeout: 1}}", slow_spf),
    "auth.reports.keep": Probe(REPORTING, REPORTING.replace("record: true",
                                                            "record: true, keep: 60d"),
                               kept_reports),
})



# -- attachments offload: the real client against the Nextcloud fake -------------------------
# A policy text naming @NC@ (plain HTTP) or @NCS@ (HTTPS, certificate of our CA) gets a fresh
# fake Nextcloud at load time (policy() below), so that each observation starts from an empty
# cloud; its user is `mailmoat` with the app password in MM_PROBE_NC, and its day is NOW's.
NC_PASSWORD = "probe-app-password"
_CLOUDS: list[NextcloudFake] = []
(FILES / "nc.pass").write_text(NC_PASSWORD + "\n")
(FILES / "nc.pass").chmod(0o600)


def _with_cloud(text: str) -> str:
    for cloud in _CLOUDS:
        cloud.stop()
    _CLOUDS[:] = [NextcloudFake(user="mailmoat", app_password=NC_PASSWORD,
                                tls=(str(CERT), str(KEY)) if "@NCS@" in text else None,
                                today=NOW.date).start()]
    return text.replace("@NCS@", _CLOUDS[0].url).replace("@NC@", _CLOUDS[0].url)


@pytest.fixture(scope="module", autouse=True)
def _stop_clouds() -> Iterator[None]:
    yield
    for cloud in _CLOUDS:
        cloud.stop()
    _CLOUDS.clear()


def offloaded(prepare: Callable[[NextcloudFake], None] = lambda cloud: None) -> Observer:
    """The attachments milter's verdict on an offload, and what the fake Nextcloud saw:
    each request (method, decoded path, query), the files stored, the link shares made."""
    def observe(pol: Policy) -> object:
        cloud = _CLOUDS[0]
        prepare(cloud)
        action, reply = attachments()(pol)[:2]  # type: ignore[index]
        return (action, reply,
                [(r.method, unquote(r.path), r.query) for r in cloud.requests],
                sorted(cloud.files()),
                [(s.path, str(s.expiration), bool(s.password)) for s in cloud.shares])
    return observe


OFFLOAD = (ATT_BASE.replace("encrypt}", "offload}") + "attachments: {offload: {nextcloud: "
           "{url: '@NC@', user: mailmoat, password_env: MM_PROBE_NC, retries: 0}}}\n")


def nc_probe(old: str, new: str, observe: Observer | None = None,
             base: str = OFFLOAD) -> Probe:
    return Probe(*swap(base, old, new), observe or offloaded())


NC = "attachments.offload.nextcloud."
POLICY_PROBES.update({
    NC + "url": nc_probe("'@NC@'", "'@NC@/nextcloud'"),
    NC + "user": nc_probe("user: mailmoat", "user: hanako"),
    NC + "password_env": nc_probe("MM_PROBE_NC", "MM_PROBE_FIXED_A"),
    NC + "password_file": nc_probe(f"password_file: {FILES / 'alpha.pass'}",
                                   f"password_file: {FILES / 'nc.pass'}",
                                   base=OFFLOAD.replace("password_env: MM_PROBE_NC",
                                                        f"password_file: {FILES / 'alpha.pass'}")),
    # The fake speaks HTTPS with a certificate of our CA, which the system CAs do not know.
    NC + "ca_file": nc_probe("retries: 0", f"retries: 0, ca_file: {CA_FILE}",
                             base=OFFLOAD.replace("@NC@", "@NCS@")),
    # The first request is answered after 1.5 s: within the default 30 s, past 1 s.
    NC + "timeout": nc_probe("retries: 0", "retries: 0, timeout: 1s",
                             offloaded(lambda cloud: cloud.delay_next(1, 1.5))),
    # The first request gets a 503: a second try (after the client's 0.5 s pause) succeeds.
    NC + "retries": nc_probe("retries: 0", "retries: 1",
                             offloaded(lambda cloud: cloud.fail_next(1, 503))),
    NC + "folder": nc_probe("retries: 0", "retries: 0, folder: 'outgoing/{date}/{id}'"),
    NC + "expire_days": nc_probe("retries: 0", "retries: 0, expire_days: 3"),
})



# -- neutralize: nested archives, the pool of workers, the sandbox requirement ---------------
def _nested_locked(path: Path) -> Path:
    """A ZIP holding a ZIP holding a password ZIP: the lock sits at depth 2."""
    locked = docs.zip_zipcrypto_python(FILES / "locked.zip", {"invoice.docx": b"x" * 500},
                                       "Secret-2026")
    middle = docs.zip_plain(FILES / "middle.zip", {"locked.zip": locked.read_bytes()})
    return docs.zip_plain(path, {"middle.zip": middle.read_bytes()})


def _nested_big(path: Path) -> Path:
    """A ZIP holding a ZIP of 20 kB (stored noise: it does not deflate) and no lock."""
    import random
    bundle = docs.zip_plain(FILES / "bundle.zip", {"data.bin": random.Random(7).randbytes(20000)})
    return docs.zip_plain(path, {"bundle.zip": bundle.read_bytes()})


MAKERS.update({"deep.zip": lambda: _made("deep.zip", _nested_locked),
               "big.zip": lambda: _made("big.zip", _nested_big),
               "other.docx": lambda: _made("other.docx", lambda p: docs.docx(p, ["y"]))})

# Two conversions that wait for each other: each says it started (a file in its private
# directory) and waits up to 5 s for a "go" that the test process writes into both private
# directories once it has seen both started at once (observer `side_by_side`). The jail
# gives them no way to meet on their own. Never converts: stderr reaches the note.
MEETING_OFFICE = fake_office("meeting-soffice", """\
    import os, sys, time
    home = os.environ["HOME"]
    open(os.path.join(home, "started"), "w").close()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(home, "go")):
            print("ran beside another conversion", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.02)
    print("ran alone", file=sys.stderr)
    sys.exit(1)
    """)


def side_by_side(*names: str) -> Observer:
    """Two messages checked at once by one neutralize milter (two SMTP sessions), each
    with one of `names` for MEETING_OFFICE, while a thread of the test process plays the
    meeting point: once two of this process's conversions have said "started" at the same
    time, each finds a "go" in its private directory."""
    def run(pol: Policy) -> object:
        import threading
        done = threading.Event()
        checker = NeutralizeChecker("mx.probe.test")
        seen: dict[str, object] = {}

        def meet() -> None:
            pattern = f"{SANDBOX_PREFIX}{os.getpid()}-*/started"
            deadline = time.monotonic() + 60  # bounded whatever happens
            while not done.is_set() and time.monotonic() < deadline:
                started = list(Path(tempfile.gettempdir()).glob(pattern))
                if len(started) >= 2:
                    for marker in started:
                        try:
                            (marker.parent / "go").touch()
                        except OSError:  # that conversion has just ended
                            pass
                done.wait(0.02)

        def check(name: str) -> None:
            seen[name] = converted(name)(pol, checker)  # type: ignore[call-arg]
        meeting = threading.Thread(target=meet, name="probe-meeting", daemon=True)
        sessions = [threading.Thread(target=check, args=(name,), name=f"probe-{name}",
                                     daemon=True) for name in names]
        meeting.start()
        try:
            for thread in sessions:
                thread.start()
            for thread in sessions:
                thread.join(60)
        finally:
            done.set()
            meeting.join(10)
        return [seen.get(name, "no answer within 60 s") for name in names]
    return run


NO_BWRAP = FILES / "no-bwrap-bin"  # a PATH where bubblewrap is not installed
NO_BWRAP.mkdir()


def without_bubblewrap(observe: Observer) -> Observer:
    """`observe` where `bwrap` is not installed: the milter looks it up in PATH (jail.py),
    and tries the jail once per process, so that answer is set aside for the probe. With
    it, what the sandbox logged it would do (refuse, or convert without the jail)."""
    def run(pol: Policy) -> object:
        import logging
        said: list[str] = []

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "event=sandbox_unavailable" in record.getMessage():
                    said.append(record.getMessage().partition(" action=")[2])
        handler, logger = Catch(), logging.getLogger("mailmoat")
        logger.addHandler(handler)
        saved_path, saved = os.environ.get("PATH", ""), dict(jail._PROBED)
        os.environ["PATH"] = str(NO_BWRAP)
        jail._PROBED.clear()
        try:
            # Unjailed, the worker runs as `nobody` when the milter is root: where the
            # milter's Python is not readable by nobody (a pyenv under /root, as on the
            # test machine) it cannot start, and the file gets neutralize.on_failure.
            # Elsewhere it converts.
            seen = observe(pol)
        finally:
            os.environ["PATH"] = saved_path
            jail._PROBED.clear()
            jail._PROBED.update(saved)
            logger.removeHandler(handler)
        return (said, seen)
    return run


MEETING_BASE = CONV_BASE + f"  soffice: {MEETING_OFFICE}\n"
POLICY_PROBES.update({
    # The password ZIP at depth 2: found within the default depth 3 (rejected as locked);
    # with a depth of 1 the worker cannot look that far and the file fails (dropped).
    "neutralize.limits.archive_depth": conv("limits: {archive_depth: 1}\n", "deep.zip"),
    "neutralize.limits.archive_bytes": conv("limits: {archive_bytes: 10000}\n", "big.zip"),
    # Two sessions at once through one milter: with 2 workers their conversions meet; with
    # 1 the second waits for the pool's one slot. (2, not the default: one per CPU.)
    "neutralize.workers": Probe(MEETING_BASE + "  workers: 2\n", MEETING_BASE + "  workers: 1\n",
                                side_by_side("doc.docx", "other.docx")),
    "neutralize.require_sandbox": conv("require_sandbox: false\n", "photo.png",
                                       observe=without_bubblewrap(converted("photo.png"))),
})


# -- serve's listeners (serve.open_listeners, as _run calls it) -------------------------------
def listening(config: Any) -> object:
    """What answers on each @PORTn@ of the config once serve has opened its listeners
    there: nothing, the metrics (HTTP), or an SMTP server, which relays for loopback only
    on the re-injection listener (the main one refuses: loopback is not internal here)."""
    settings = smtp_settings(config, SMTP_POLICY, None, None)

    async def what_answers(port: int) -> str:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return "nothing"
        try:
            # An SMTP server greets first; the metrics wait for the request.
            writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            first = (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
            if not first.startswith("220"):
                return first
        finally:
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await _reply(reader)
            for line in (EHLO, FROM, "RCPT TO:<u@elsewhere.example>"):
                writer.write(line.encode() + b"\r\n")
                said = await _reply(reader)
            return f"SMTP, RCPT to elsewhere: {said[:3]}"
        finally:
            writer.close()

    async def run() -> object:
        queue = Queue(_CONFIG_DIR[0] / "smtp-spool")
        servers = await open_listeners(config, GatewayHandler(settings, queue),
                                       GatewayHandler(reinject_smtp_settings(config), queue))
        try:
            return {name: await what_answers(port) for name, port in sorted(_PORTS.items())}
        finally:
            for server in servers:
                if server is not None:
                    server.close()
                    await server.wait_closed()
    return asyncio.run(run())


LISTENING = ("gateway: {listen: '127.0.0.1:@PORT1@', reinject_listen: '127.0.0.1:@PORT2@', "
             "metrics_listen: '127.0.0.1:@PORT3@'}\n")
GATEWAY_PROBES.update({
    f"gateway.{key}": Probe(*swap(LISTENING, f"{key}: '127.0.0.1:@PORT{n}@'",
                                  f"{key}: '127.0.0.1:@PORT4@'"), listening)
    for n, key in enumerate(("listen", "reinject_listen", "metrics_listen"), 1)})



def logged_line(config: Any) -> object:
    """Where one event goes and in what form, after the logging set-up every command makes
    with gateway.log (syslog: a datagram socket of the probe's own, named by the env var
    eventlog reads in place of /dev/log)."""
    import json
    import socket as sockets

    from milters.core.eventlog import SYSLOG_SOCKET_ENV, log_event, setup_logging
    read, write = os.pipe()
    path = str(_CONFIG_DIR[0] / "syslog.sock")
    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_DGRAM) as syslog:
        syslog.bind(path)
        syslog.setblocking(False)
        saved, saved_env = sys.stderr, os.environ.get(SYSLOG_SOCKET_ENV)
        os.environ[SYSLOG_SOCKET_ENV] = path
        sys.stderr = os.fdopen(write, "w", closefd=False)
        try:
            setup_logging("probe", settings=config.log)
            log_event("probe_event", queue_id="ABC")
        finally:
            sys.stderr = saved
            os.environ.pop(SYSLOG_SOCKET_ENV)
            if saved_env is not None:
                os.environ[SYSLOG_SOCKET_ENV] = saved_env
            setup_logging("test")
        os.set_blocking(read, False)
        try:
            text, where = os.read(read, 4096).decode(), "stderr"
        except BlockingIOError:
            text, where = syslog.recv(4096).decode(), "syslog"
        finally:
            os.close(read)
            os.close(write)
            os.unlink(path)
    body = text[text.index("{"):] if "{" in text else ""
    return where, "json" if body and json.loads(body)["event"] == "probe_event" else "keyvalue"


GATEWAY_PROBES.update({
    "gateway.log.format": Probe("", "gateway: {log: {format: json}}\n", logged_line),
    "gateway.log.to": Probe("", "gateway: {log: {to: syslog}}\n", logged_line),
})


def audit_kept(config: Any) -> object:
    """Where the tee of a process (as each command installs it) keeps a story event, and
    what the retention purge (the delivery process's) removes of a record from 1970."""
    import logging

    from milters.core.audit.tee import AuditTee, install_tee, purge_expired
    from milters.core.eventlog import log_event
    log = install_tee(config, "probe")
    if log is None:
        return "not recorded"
    for leftover in Path(getattr(log, "path", "/nonexistent")).parent.glob("*audit.db*"):
        leftover.unlink()  # each probe run on a fresh file (the connection opens lazily)
    try:
        log.append("queued", queue_id="OLD", now=1.0)
        log_event("queued", queue_id="PROBE1", sender="a@example.jp")
        log.flush()
        purged = purge_expired(log, config.audit.retention)
        return (getattr(log, "path", None), purged, bool(log.story("PROBE1")))
    finally:
        logger = logging.getLogger("mailmoat")
        for handler in list(logger.handlers):
            if isinstance(handler, AuditTee):
                logger.removeHandler(handler)
        log.close()


_AUDIT_BASE = "store: sqlite:///state.db\n"
GATEWAY_PROBES.update({
    "audit.enabled": Probe(_AUDIT_BASE, _AUDIT_BASE + "audit: {enabled: false}\n", audit_kept),
    "audit.retention": Probe(_AUDIT_BASE, _AUDIT_BASE + "audit: {retention: 0}\n", audit_kept),
    "audit.file": Probe(_AUDIT_BASE, _AUDIT_BASE + "audit: {file: audit.db}\n", audit_kept),
})


def review_made(config: Any) -> object:
    """Where the review book keeps a review, what its link and notice say (the key signs
    the token: another key file, another signature)."""
    from milters.core.review import (console_url, link, load_token_key, new_review,
                                     notices_for, open_review_book)
    from milters.core.review.tokens import issue
    book = open_review_book(config)
    record = book.create(new_review(queue_id="Q", kind="delay", sender="a@example.jp",
                                    recipients=["b@partner.example"], subject="s", now=0.0,
                                    timeout=60))
    token = issue(load_token_key(config.review.token_key_file), "0" * 32, "a@example.jp",
                  "cancel", 60)
    raw = notices_for(config).render_for_sender(record, {"cancel": link(console_url(config),
                                                                        token)}, "en")
    head = raw.split(b"\r\n\r\n")[0].decode()
    book.close()
    return (getattr(book, "path", None), token, link(console_url(config), ""),
            [line for line in head.split("\r\n") if line.startswith("From:")])


_REVIEW_BASE = "store: sqlite:///state.db\n"
GATEWAY_PROBES.update({
    "review.token_key_file": Probe(_REVIEW_BASE, _REVIEW_BASE + "review: {token_key_file: "
                                   "other-key}\n", review_made),
    "review.console_url": Probe(_REVIEW_BASE, _REVIEW_BASE + "review: {console_url: "
                                "\"https://mail.example.jp\"}\n", review_made),
    "review.notice_from": Probe(_REVIEW_BASE, _REVIEW_BASE + "review: {notice_from: "
                                "rv@example.jp}\n", review_made),
    "review.file": Probe(_REVIEW_BASE, _REVIEW_BASE + "review: {file: rv.db}\n", review_made),
})


def reviews_kept(config: Any) -> object:
    """review.retention: whether a review carried out 30 days ago outlives the runner's
    purge (serve's and postfix-review's runners share it)."""
    import asyncio
    import time as clock
    from milters.core.review import new_review
    from mta.review.postfix_queue import PostfixQueue
    from mta.review.postfix_runner import postfix_review_runner
    now = clock.time()
    runner = postfix_review_runner(config, PostfixQueue(), clock=lambda: now)
    book = runner.book
    record = book.create(new_review(queue_id="Q", kind="delay", sender="a@example.jp",
                                    recipients=["b@partner.example"], subject="s",
                                    now=now - 31 * 86400, timeout=60))
    book.decide(record.id, "a@example.jp", "192.0.2.1", "cancel", now=now - 31 * 86400 + 1)
    book.carry_out(record.id, now=now - 30 * 86400)
    asyncio.run(runner._purge(now))
    kept = book.get(record.id) is not None
    book.close()
    return kept


GATEWAY_PROBES.update({
    "review.retention": Probe(_REVIEW_BASE, _REVIEW_BASE + "review: {retention: 10d}\n",
                              reviews_kept),
})


def digests_made(config: Any) -> object:
    """review.digest: when its periods start, who gets a digest of what, in which language
    (a fresh book and spool each time: one approval, two quarantined messages)."""
    import dataclasses
    from milters.core.review import open_review_book, new_review
    from mta.queue.spool import Envelope as QueueEnvelope, Queue, RecipientState
    from mta.review.digest_run import build_digests, render
    from mta.review.digest_timer import period_start
    work = Path(tempfile.mkdtemp(prefix="digest-probe-"))
    config = dataclasses.replace(config, store=f"sqlite:///{work}/state.db",
                                 queue=dataclasses.replace(config.queue, dir=work / "spool"),
                                 relay_domains=("example.jp",), review=dataclasses.replace(
                                     config.review, token_key_file=work / "key"))
    book = open_review_book(config)
    book.create(new_review(queue_id="Q", kind="approve", sender="a@example.jp",
                           recipients=["b@partner.example"], subject="s", now=0.0,
                           timeout=1e10, approvers=["boss@example.jp"], language="en"))
    book.close()
    queue = Queue(work / "spool")
    for n, rcpt in enumerate(("c@example.jp", "c@example.jp", "d@other.example")):
        queue.enqueue(b"Subject: q\r\n\r\nx\r\n", QueueEnvelope(
            f"H{n}", "x@outside.example", [RecipientState(rcpt)], float(n), hold_reason="dmarc"))
    settings = config.review.digest
    when = period_start(1_700_000_000.0, settings.at, settings.every) if settings else None
    found = build_digests(config, now=1_700_000_000.0)
    shutil.rmtree(work)
    return (when, [(d.person, d.language, d.counts, len(d.held),
                    render(config, d, 0.0).split(b"\r\n\r\n")[0].count(b"Subject"))
                   for d in found])


_DIGEST = "review:\n  digest: {%s}\n"
GATEWAY_PROBES.update({
    "review.digest.at": Probe(_DIGEST % "", _DIGEST % "at: '09:15'", digests_made),
    "review.digest.every": Probe(_DIGEST % "", _DIGEST % "every: 5h", digests_made),
    "review.digest.to": Probe(_DIGEST % "", _DIGEST % "to: [approvers]", digests_made),
    "review.digest.language": Probe(_DIGEST % "", _DIGEST % "language: ja", digests_made),
    "review.digest.max_items": Probe(_DIGEST % "", _DIGEST % "max_items: 1", digests_made),
    "review.digest.domains": Probe(_DIGEST % "", _DIGEST % "domains: [other.example]",
                                   digests_made),
})


# -- sign (issue 15): key files made once for this module, mode 0600 ----------------------
def _sign_key_files() -> Path:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519 as ed, rsa as rs
    folder = Path(tempfile.mkdtemp(prefix="mm-sign-probe-"))
    import atexit
    atexit.register(shutil.rmtree, folder, True)
    for name, key in (("r1", rs.generate_private_key(public_exponent=65537, key_size=1024)),
                      ("r2", rs.generate_private_key(public_exponent=65537, key_size=1024)),
                      ("e1", ed.Ed25519PrivateKey.generate())):
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
        os.chmod(folder / f"{name}.key", 0o600)
    return folder


SIGN_KEYS = _sign_key_files()
SIGN_BASE = f"""\
internal_networks: [10.0.0.0/8]
sign:
  keys:
    - {{domain: example.com, selector: r1, file: "{SIGN_KEYS / 'r1.key'}"}}
"""
SIGNED_MAIL = (b"From: A <a@example.com>\r\nTo: u@example.jp\r\nSubject: s\r\n"
               b"Date: Sun, 6 Dec 2026 10:00:00 +0000\r\n\r\nbody\r\n")


def signed(raw: bytes = SIGNED_MAIL, rcpt: str = "u@example.jp") -> Observer:
    """The DKIM-Signature fields the sign milter adds (a fixed clock: same input, same
    bytes: RSA PKCS#1 v1.5 and ed25519 are deterministic)."""
    def observe(pol: Policy) -> object:
        from milters.sign.logic import Signer
        message = Message(raw=raw, envelope=env(client="10.0.0.5", sender="a@example.com",
                                                rcpts=(rcpt,)))
        return [(e.name, e.value) for e in  # type: ignore[attr-defined]
                Signer(clock=lambda: 1796560000).sign_message(pol, message).edits]
    return observe


def sgn(setting: str, observe: Observer | None = None) -> Probe:
    return Probe(SIGN_BASE, SIGN_BASE + textwrap.indent(setting, "  ") + "\n",
                 observe or signed())


POLICY_PROBES.update({
    "defaults.sign": Probe(SIGN_BASE, SIGN_BASE + "defaults: {sign: none}\n", signed()),
    "rules[].then.sign": Probe(SIGN_BASE, SIGN_BASE + "rules:\n  - name: r\n    when: {}\n"
                               "    then: {sign: none}\n", signed()),
    "tests[].expect.sign.action": policy_test_probe("{ratelimit: {action: exempt}}",
                                                    "{sign: {action: sign}}"),
    "tests[].expect.sign.rule": policy_test_probe("{ratelimit: {action: exempt}}",
                                                  "{sign: {rule: r}}"),
    "tests[].expect.sign.domain": policy_test_probe("{ratelimit: {action: exempt}}",
                                                    "{sign: {domain: example.com}}"),
    "sign.keys[].domain": Probe(*swap(SIGN_BASE, "domain: example.com", "domain: example.net"),
                                signed()),
    "sign.keys[].selector": Probe(*swap(SIGN_BASE, "selector: r1", "selector: r9"), signed()),
    "sign.keys[].file": Probe(*swap(SIGN_BASE, "r1.key", "r2.key"), signed()),
    "sign.domains": Probe(SIGN_BASE, SIGN_BASE + "  domains: {example.org: example.com}\n",
          signed(SIGNED_MAIL.replace(b"a@example.com", b"a@example.org"))),
    "sign.subdomains": sgn("subdomains: false",
                           signed(SIGNED_MAIL.replace(b"a@example.com", b"a@x.example.com"))),
    "sign.headers": sgn("headers: [from, to]\noversign: [from]"),
    "sign.oversign": sgn("oversign: [from]"),
    "sign.canonicalization": sgn("canonicalization: simple/simple"),
    "sign.expire": sgn("expire: 1d"),
})


ARC_BASE = SIGN_BASE + f"""\
    - {{domain: example.net, selector: r2, file: "{SIGN_KEYS / 'r2.key'}"}}
  arc: {{key: r1._domainkey.example.com}}
"""


def sealed() -> Observer:
    """The ARC set the sign milter adds to an inbound message the auth milter checked and
    no milter changed."""
    def observe(pol: Policy) -> object:
        from milters.sign.logic import Signer
        from tests.unit.test_sign_arc import AUTHSERV_ID, auth_header
        message = Message(raw=auth_header(None) + SIGNED_MAIL, envelope=env())
        return [(e.name, e.value) for e in  # type: ignore[attr-defined]
                Signer(AUTHSERV_ID, clock=lambda: 1796560000).sign_message(pol, message).edits]
    return observe


POLICY_PROBES.update({
    "sign.arc.seal": Probe(*swap(ARC_BASE, "arc: {key:", "arc: {seal: all, key:"), sealed()),
    "sign.arc.key": Probe(*swap(ARC_BASE.replace("arc: {key:", "arc: {seal: all, key:"),
                                "key: r1._domainkey.example.com",
                                "key: r2._domainkey.example.net"), sealed()),
})


def reinjection_chain(config: Any) -> object:
    """The chain serve's re-injection listener runs (copies and notices)."""
    from mta.cli import with_reinjection
    return [m.endpoint.name for m in
            MilterSupervisor(with_reinjection(config), None).members(reinjection=True)]


GATEWAY_PROBES["milters[].reinjection"] = Probe(
    "milters: [{name: attachments}, {name: sign}]\n",
    "milters: [{name: attachments}, {name: sign, reinjection: false}]\n", reinjection_chain)


# -- the console's logins: authenticate() against local accounts and a private slapd --------
_SLAPD: list[Slapd] = []
_LOGIN_FILES = Path(tempfile.mkdtemp(prefix="mailmoat-login-probes-"))
READER_FILE, WRONG_READER_FILE = _LOGIN_FILES / "reader.pass", _LOGIN_FILES / "wrong.pass"
ACCOUNTS_FILE = _LOGIN_FILES / "console-users"


def ldap_server() -> Slapd:
    """The directory @LDAP@ names (tests/harness/slapd.py), started on first use."""
    if not _SLAPD:
        _SLAPD.append(Slapd().start())
        for path, text in ((READER_FILE, SLAPD_READER_PW), (WRONG_READER_FILE, "wrong")):
            path.write_text(text + "\n")
            path.chmod(0o600)
        set_account(ACCOUNTS_FILE, "probe", "auditor", ["probe@example.jp"], "probe-pw")
    return _SLAPD[0]


@pytest.fixture(scope="module", autouse=True)
def _stop_slapd() -> Iterator[None]:
    yield
    for server in _SLAPD:
        server.stop()
    _SLAPD.clear()


def console_login(name: str, password: str) -> Observer:
    """What authenticate() makes of one login: the role and addresses, or the reason."""
    def observe(config: Any) -> object:
        try:
            actor = authenticate(config.console, MemoryStore(), name, password, "127.0.0.1")
        except LoginError as exc:
            return ("refused", getattr(exc, "reason", str(exc)))
        return (actor.role, sorted(actor.addresses))
    return observe


ALICE = console_login("alice", SLAPD_PASSWORDS["alice"])
_LDAP = ("console:\n  ldap:\n    url: @LDAP@\n    user_dn: 'uid={{name}},{base}'\n"
         "    roles: {roles}\n{more}")


def ldap(base: str = SLAPD_PEOPLE, roles: str = f"{{admin: ['{SLAPD_ADMINS}'], user: '*'}}",
         more: str = "") -> str:
    return _LDAP.format(base=base, roles=roles, more="".join(f"    {line}\n"
                                                              for line in more.splitlines()))


def ldap_search(more: str = "", base: str = SLAPD_PEOPLE) -> str:
    roles = f"{{admin: ['{SLAPD_ADMINS}']}}"
    return ("console:\n  ldap:\n    url: @LDAP@\n"
            f"    search_base: '{base}'\n    roles: {roles}\n"
            f"    bind_dn: 'cn=reader,dc=example,dc=jp'\n" + "".join(
                f"    {line}\n" for line in more.splitlines()))


GATEWAY_PROBES.update({
    "console.users_file": Probe("", f"console: {{users_file: {ACCOUNTS_FILE}}}\n",
                                console_login("probe", "probe-pw")),
    "console.ldap.url": Probe(ldap(), ldap().replace("@LDAP@", "ldap://127.0.0.1:1"), ALICE),
    "console.ldap.starttls": Probe(ldap(), ldap(more="starttls: true"), ALICE),
    "console.ldap.user_dn": Probe(ldap(), ldap(base=SLAPD_GROUPS), ALICE),
    "console.ldap.search_base": Probe(
        ldap_search(f"bind_password_file: {READER_FILE}"),
        ldap_search(f"bind_password_file: {READER_FILE}", base=SLAPD_GROUPS), ALICE),
    "console.ldap.search_filter": Probe(
        ldap_search(f"bind_password_file: {READER_FILE}"),
        ldap_search(f"bind_password_file: {READER_FILE}\nsearch_filter: '(mail={{name}})'"),
        ALICE),
    "console.ldap.bind_dn": Probe(
        ldap_search(f"bind_password_file: {READER_FILE}"),
        ldap_search(f"bind_password_file: {READER_FILE}").replace("cn=reader", "cn=root"),
        ALICE),
    "console.ldap.bind_password_file": Probe(
        ldap_search(f"bind_password_file: {READER_FILE}"),
        ldap_search(f"bind_password_file: {WRONG_READER_FILE}"), ALICE),
    "console.ldap.group_attribute": Probe(ldap(), ldap(more="group_attribute: description"),
                                          ALICE),
    "console.ldap.group_search_base": Probe(
        ldap(more="group_attribute: description"),
        ldap(more=f"group_attribute: description\ngroup_search_base: '{SLAPD_GROUPS}'"),
        ALICE),
    "console.ldap.roles.admin": Probe(ldap(), ldap(roles=f"{{admin: ['{SLAPD_AUDITORS}'], "
                                                         "user: '*'}"), ALICE),
    "console.ldap.roles.auditor": Probe(ldap(roles="{user: '*'}"),
                                        ldap(roles=f"{{auditor: ['{SLAPD_ADMINS}'], "
                                                   "user: '*'}"), ALICE),
    "console.ldap.roles.user": Probe(ldap(roles=f"{{admin: ['{SLAPD_AUDITORS}']}}"),
                                     ldap(roles=f"{{admin: ['{SLAPD_AUDITORS}'], user: '*'}}"),
                                     ALICE),
    "console.ldap.mail_attribute": Probe(ldap(), ldap(more="mail_attribute: cn"), ALICE),
})


def bobs_manager(config: Any) -> object:
    """The review milter's directory (milters/core/directory.py over console.ldap): whom
    approvers: [manager] names for bob."""
    from milters.core.directory import open_directory
    directory = open_directory(config)
    return directory.manager_address("bob@example.jp") if directory else "no directory"


_REVIEWER = ldap_search(f"bind_password_file: {READER_FILE}")
GATEWAY_PROBES.update({
    "review.ldap.manager_attribute": Probe(
        _REVIEWER, _REVIEWER + "review: {ldap: {manager_attribute: seeAlso}}\n", bobs_manager),
})


def console_observed(config: Any) -> object:
    """The console as `mailmoat console` builds it (mta/console/server.py): where it binds,
    whether its TLS files load, which key file it makes, then a login through the app with a
    clock of its own: the page's language, a session left idle 31 minutes, and how long a
    session touched every 25 minutes lives."""
    import re as _re
    from starlette.testclient import TestClient
    from mta.console.app import create_app
    from mta.console.server import bind, check_tls
    from mta.console.sessions import load_secret_key
    from tests.harness.console_login import StandInLogin
    settings = config.console
    try:
        check_tls(config)
        tls: object = "loaded"
        if settings.tls_cert is not None:  # the certificate uvicorn is given, by its subject
            from cryptography import x509
            tls = x509.load_pem_x509_certificate(
                settings.tls_cert.read_bytes()).subject.rfc4514_string()
    except ConfigError as exc:
        tls = ("refused", exc.problems)
    sock = bind(settings.listen)
    host = sock.getsockname()[0]
    sock.close()
    key = load_secret_key(settings.secret_key_file)
    key_file = str(settings.secret_key_file.relative_to(_CONFIG_DIR[0]))
    clock = [1_000_000.0]
    app = create_app(settings, key=key, authenticate=StandInLogin(), clock=lambda: clock[0])

    def logged_in() -> TestClient:
        client = TestClient(app, base_url="https://127.0.0.1")
        page = client.get("/login", headers={"accept-language": "en"})
        token = _re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        client.post("/login", data={"csrf_token": token, "name": "alice",
                                    "password": "alice-pass-2026"})
        return client

    page = TestClient(app).get("/login", headers={"accept-language": "en"})
    language = _re.search(r'<html lang="(\w+)"', page.text).group(1)
    idle = logged_in()
    clock[0] += 31 * 60
    idle_status = idle.get("/api/me").status_code
    busy, lived = logged_in(), 0
    while lived < 30 and busy.get("/api/me").status_code == 200:
        clock[0] += 25 * 60
        lived += 1
    return {"host": host, "tls": tls, "key_file": key_file, "language": language,
            "idle": idle_status, "touches": lived}


CONSOLE = "console: {listen: '127.0.0.1:@PORT1@'"
CONSOLE_TLS = f"{CONSOLE}, tls: {{cert: {CERT}, key: {KEY}}}"
GATEWAY_PROBES.update({
    "console.listen": Probe(CONSOLE + "}\n", "console: {listen: '127.0.0.2:@PORT1@'}\n",
                            console_observed),
    "console.tls.cert": Probe(CONSOLE_TLS + "}\n",
                              f"{CONSOLE}, tls: {{cert: {OTHER_CERT}, key: {KEY}}}}}\n",
                              console_observed),
    "console.tls.key": Probe(CONSOLE_TLS + "}\n",
                             f"{CONSOLE}, tls: {{cert: {CERT}, key: {OTHER_KEY}}}}}\n",
                             console_observed),
    "console.secret_key_file": Probe(CONSOLE + "}\n",
                                     CONSOLE + ", secret_key_file: keys/console.key}\n",
                                     console_observed),
    "console.session_idle": Probe(CONSOLE + "}\n", CONSOLE + ", session_idle: 1h}\n",
                                  console_observed),
    "console.session_max": Probe(CONSOLE + "}\n", CONSOLE + ", session_max: 1d}\n",
                                 console_observed),
    "console.language": Probe(CONSOLE + "}\n", CONSOLE + ", language: ja}\n",
                              console_observed),
})


# Keys without a probe yet, and why: work left (see the report of issue 13), never a pass.
UNPROVEN: dict[str, str] = {
    "console.ldap.ca_file": "needs a slapd with TLS (tests/harness/slapd.py has none yet): "
                            "trusted CA -> StartTLS binds, system CAs -> refused",
    "console.ldap.timeout": "the only difference is how long a hung slapd is waited for; "
                            "needs an observer that counts ldap3's socket timeouts, not time",
}


# -- the tests -------------------------------------------------------------------------------
def test_every_key_of_every_schema_has_a_probe() -> None:
    missing = [f"{key}: no probe proves this gateway config key changes behaviour; add one "
               f"to GATEWAY_PROBES in {THIS_FILE}" for key in gateway_keys()
               if key not in GATEWAY_PROBES and key not in UNPROVEN]
    missing += [f"{key}: no probe proves this policy key changes behaviour; add one to "
                f"POLICY_PROBES in {THIS_FILE}" for key in policy_keys()
                if key not in POLICY_PROBES and key not in UNPROVEN]
    assert not missing, "\n".join(missing)


def test_no_probe_or_exception_names_a_key_the_schemas_do_not_have() -> None:
    known = set(gateway_keys()) | set(policy_keys())
    stale = sorted((set(GATEWAY_PROBES) | set(POLICY_PROBES) | set(UNPROVEN)) - known)
    assert not stale, f"no such key any more (remove it from {THIS_FILE}): {stale}"
    proven = sorted((set(GATEWAY_PROBES) | set(POLICY_PROBES)) & set(UNPROVEN))
    assert not proven, f"these keys have a probe now: take them out of UNPROVEN: {proven}"


def _observed(load: Callable[[str], Any], text: str, observe: Observer) -> object:
    try:
        loaded = load(text)
    except ConfigError as exc:  # a refused value changes behaviour too: nothing runs
        return ("refused", exc.problems)
    return observe(loaded)


# What the parametrized tests below run: probes added after this line would be checked for
# a name only, never run (the test after this one catches that).
COLLECTED = (sorted(POLICY_PROBES), sorted(GATEWAY_PROBES))


def test_every_probe_is_run() -> None:
    assert COLLECTED == (sorted(POLICY_PROBES), sorted(GATEWAY_PROBES)), (
        f"probes added below the tests are never run: move them above them in {THIS_FILE}")


@pytest.mark.parametrize("key", COLLECTED[0])
def test_the_policy_key_changes_what_its_consumer_decides(
        key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MM_PROBE_NC", "probe-app-password")
    monkeypatch.setenv("MM_PROBE_FIXED_A", "Alpha%Y")
    monkeypatch.setenv("MM_PROBE_FIXED_B", "Beta%Y")
    probe = POLICY_PROBES[key]
    before = _observed(policy, probe.before, probe.observe)
    assert before == _observed(policy, probe.before, probe.observe), (
        f"{key}: the probe's observer gives different answers for the same config (random "
        "parts must be left out of what it returns, or any change would look like an effect)")
    after = _observed(policy, probe.after, probe.observe)
    assert before != after, (f"{key}: setting it changed nothing its consumer decides "
                             f"(probe in POLICY_PROBES, {THIS_FILE}); both gave {before!r}")


@pytest.mark.parametrize("key", COLLECTED[1])
def test_the_gateway_key_changes_what_its_consumer_decides(
        key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILMOAT_REDIS_PASSWORD", raising=False)
    monkeypatch.setenv("MM_PROBE_PW", "probe-from-env")
    (tmp_path / "probe.pass").write_text("probe-from-file\n")
    (tmp_path / "probe.pass").chmod(0o600)
    _CONFIG_DIR[:] = [tmp_path]
    probe = GATEWAY_PROBES[key]
    before = _observed(gateway, probe.before, probe.observe)
    assert before == _observed(gateway, probe.before, probe.observe), (
        f"{key}: the probe's observer gives different answers for the same config")
    after = _observed(gateway, probe.after, probe.observe)
    assert before != after, (f"{key}: setting it changed nothing its consumer decides "
                             f"(probe in GATEWAY_PROBES, {THIS_FILE}); both gave {before!r}")

