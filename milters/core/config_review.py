"""The gateway config's `review:` section: outbound review's book, the key that signs its
links, where the links point, who sends the notices, the daily digests and how long a
finished review is kept. The policy's `review:` action says which mail is held; this says
how. config.py reads it as one part of the gateway config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from .policy.schema import Duration, Field, ListOf, Number, Str, Struct


# -- outbound review (milters/core/review): the gateway's side of it ------------------------
@dataclass(frozen=True)
class ReviewSettings:
    """`review:`: where reviews are kept, the key that signs their links, where the links
    point and whom the notices come from. The policy's `review:` action says which mail."""

    token_key_file: Path = Path("var/review-token-key")
    console_url: str | None = None  # None: http(s)://console.listen
    notice_from: str | None = None  # None: mailmoat-review@HOSTNAME
    file: Path | None = None  # None: beside the store's SQLite file, or in its Redis
    manager_attribute: str = "manager"  # review.ldap: the DN of a person's manager
    digest: "DigestSettings | None" = None  # review.digest; None: no digests
    retention: float = 90 * 86400.0  # seconds a carried-out review is kept; 0 = forever


def _review_url(text: str) -> str:
    parts = urlsplit(text)
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or not text.isascii() or any(c.isspace() for c in text)):
        raise ValueError(f"console_url is the console's address, like https://mail.example.jp"
                         f":8026, with no query or fragment (got {text[:100]})")
    return text.rstrip("/")


def _review_from(text: str) -> str:
    if not re.fullmatch(r"[!#-'*+\-/-9=?A-Z^-~.]+@[A-Za-z0-9.-]+", text):
        raise ValueError(f"notice_from is one ASCII address, like mailmoat-review@example.jp "
                         f"(got {text[:100]})")
    return text


def review_spec(local: Callable[[str], Path]) -> Struct:
    return Struct({
        "token_key_file": Field(Str(), "var/review-token-key",
                                doc="The key that signs review links (HMAC-SHA256); made (mode "
                                    "0600) on first use when missing, refused when group or "
                                    "others may read it."),
        "console_url": Field(Str(max_len=500), None,
                             doc="The console's address as the people who get review notices "
                                 "reach it; links are URL/review/TOKEN. Not set: "
                                 "http(s)://console.listen."),
        "notice_from": Field(Str(max_len=320), None,
                             doc="The From address of review notices. Not set: "
                                 "mailmoat-review@ the gateway's hostname."),
        "file": Field(Str(), None,
                      doc="The review book's SQLite file. Not set: beside a SQLite store's file "
                          "(state.db -> state-review.db), or in Redis with a redis:// store."),
        "ldap": Field(Struct({
            "manager_attribute": Field(Str(max_len=100), "manager",
                                       doc="The attribute of a person's entry holding their "
                                           "manager's DN (approvers: [manager]); the directory "
                                           "is console.ldap's."),
        }, expected="review LDAP settings: manager_attribute"), None,
            doc="How approvers: [manager] reads the directory (console.ldap)."),
        # -- review.digest (the daily digests) --
        "digest": Field(_digest_spec(), None,
                        doc="The digest mails: per person, their mail held for review, the "
                            "approvals waiting for them and their quarantined mail. Not set: "
                            "no digests."),
        # -- end of review.digest --
        "retention": Field(Duration(minimum=0), 90 * 86400.0,
                           doc="How long a review is kept once carried out (sent, or deleted "
                               "and the sender told); then the runner forgets it, and its "
                               "links get the 'unknown review' page. The audit log keeps the "
                               "decisions. 0: keep forever."),
    }, build=lambda token_key_file, console_url, notice_from, file, ldap, digest, retention:
        ReviewSettings(
            local(token_key_file), _review_url(console_url) if console_url else None,
            _review_from(notice_from) if notice_from else None, local(file) if file else None,
            (ldap or {}).get("manager_attribute", "manager"), digest, retention),
        expected="review settings: token_key_file, console_url, notice_from, file, ldap, "
                 "digest, retention")


# -- review.digest ------------------------------------------------------------------------------
DIGEST_AUDIENCES = ("senders", "recipients", "approvers")
DIGEST_LANGUAGES = ("auto", "ja", "en")


@dataclass(frozen=True)
class DigestSettings:
    """`review.digest:` when (the first run of each day at `at`, then every `every`), to whom,
    in which language, how long a list may get."""

    at: tuple[int, int, int] = (8, 30, 0)  # local time of day: hour, minute, second
    every: float = 86400.0
    to: tuple[str, ...] = DIGEST_AUDIENCES
    language: str = "auto"  # auto: the language of the person's review notices, else ja
    max_items: int = 200  # per list of one person's digest; the rest as "and N more"
    domains: tuple[str, ...] = ()  # whose quarantined mail is listed; (): relay_domains


class _TimeOfDay(Str):
    def __init__(self) -> None:
        super().__init__(max_len=8)
        self.expected = "a time of day like 08:30 (or 08:30:15), local time"

    def parse(self, text: str) -> tuple[int, int, int]:
        match = re.fullmatch(r"([01]?[0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?", text.strip())
        if not match:
            raise ValueError(f"expected {self.expected}")
        return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def _digest_audiences(values: list[str]) -> tuple[str, ...]:
    if not values:
        raise ValueError("name at least one of senders, recipients, approvers (or leave "
                         "review.digest out: no digests)")
    return tuple(dict.fromkeys(values))


def _digest_spec() -> Struct:
    defaults = DigestSettings()
    return Struct({
        "at": Field(_TimeOfDay(), defaults.at,
                    doc="The local time of day of the first digest run; serve sends the "
                        "digests once per period, also after a restart (never twice)."),
        "every": Field(Duration(minimum=60), defaults.every,
                       doc="The period between runs, from `at` (1d: daily; 12h: twice a day)."),
        "to": Field(ListOf(Str(DIGEST_AUDIENCES), check=_digest_audiences), DIGEST_AUDIENCES,
                    doc="Who gets one: senders (their mail held for review, their quarantined "
                        "mail), recipients (quarantined mail to them), approvers (approvals "
                        "waiting for them)."),
        "language": Field(Str(DIGEST_LANGUAGES), defaults.language,
                          doc="ja, en, or auto: the language of the person's review notices "
                              "(the policy's review.language), ja when they have none."),
        "max_items": Field(Number(minimum=1, maximum=1000, integer=True), defaults.max_items,
                           doc="Items per list in one digest; the rest are counted (\"and N "
                               "more\"), so a flood cannot make a huge mail."),
        "domains": Field(ListOf(Str(max_len=253)), (),
                         doc="Only addresses in these domains get digests of quarantined mail "
                             "(a forged outside sender gets nothing). []: the relay_domains."),
    }, build=lambda at, every, to, language, max_items, domains: DigestSettings(
        at, float(every), tuple(to), language, int(max_items),
        tuple(d.lower().strip(".") for d in domains)),
        expected="digest settings: at, every, to, language, max_items, domains")
# -- end of outbound review -------------------------------------------------------------------
