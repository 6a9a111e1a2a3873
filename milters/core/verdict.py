"""Verdicts and SMTP replies as types, shared by every milter and by the MTA."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_REPLY_RE = re.compile(r"^([245][0-9][0-9])(?:[ -]([245]\.[0-9]{1,3}\.[0-9]{1,3}))?(?:[ -](.*))?$",
                       re.DOTALL)


class Action(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"


@dataclass(frozen=True)
class SmtpReply:
    """An SMTP reply: basic code, RFC 3463 enhanced code and text."""

    code: int
    enhanced: str | None
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if self.enhanced and self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced code {self.enhanced} does not match reply class {self.code}")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("SMTP reply text must be one line")

    @classmethod
    def parse(cls, text: str) -> "SmtpReply":
        """Parse '451 4.7.1 Try later' (the enhanced code and text are optional)."""
        match = _REPLY_RE.match(text.strip())
        if not match:
            raise ValueError("an SMTP reply looks like '451 4.7.1 Try again later'")
        code, enhanced, rest = match.groups()
        return cls(int(code), enhanced, (rest or "").strip())

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced or "", self.text) if part)


DEFAULT_TEMPFAIL = SmtpReply(451, "4.7.1", "Service temporarily unavailable, try again later")
DEFAULT_REJECT = SmtpReply(550, "5.7.1", "Message rejected by policy")


@dataclass(frozen=True)
class Verdict:
    """What a milter decided at one stage, and why (the reason goes to the log)."""

    action: Action
    reply: SmtpReply | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.reply is None:
            return
        if self.action is Action.TEMPFAIL and not self.reply.is_temporary:
            raise ValueError(f"a tempfail needs a 4xx reply, got {self.reply}")
        if self.action is Action.REJECT and not self.reply.is_permanent:
            raise ValueError(f"a reject needs a 5xx reply, got {self.reply}")

    @classmethod
    def cont(cls, reason: str = "") -> "Verdict":
        if not reason and cls is Verdict:
            return _CONTINUE  # immutable, and asked for at every milter stage
        return cls(Action.CONTINUE, None, reason)

    @classmethod
    def accept(cls, reason: str = "") -> "Verdict":
        return cls(Action.ACCEPT, None, reason)

    @classmethod
    def tempfail(cls, reply: SmtpReply = DEFAULT_TEMPFAIL, reason: str = "") -> "Verdict":
        return cls(Action.TEMPFAIL, reply, reason)

    @classmethod
    def reject(cls, reply: SmtpReply = DEFAULT_REJECT, reason: str = "") -> "Verdict":
        return cls(Action.REJECT, reply, reason)

    @classmethod
    def discard(cls, reason: str = "") -> "Verdict":
        return cls(Action.DISCARD, None, reason)

    @property
    def ends_transaction(self) -> bool:
        return self.action is not Action.CONTINUE


_CONTINUE = Verdict(Action.CONTINUE)
