"""What every delivery agent answers: per recipient, a status (delivered, deferred, bounced)
and the reply behind it, as Postfix's delivery agents do: 4xx and network errors defer, 5xx
bounces. The agents are relay.py (SMTP to a next hop) and maildir.py (local use); routing.py
picks one per recipient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mta.queue.spool import StoredMessage

DELIVERED, DEFERRED, BOUNCED = "delivered", "deferred", "bounced"


@dataclass(frozen=True)
class Outcome:
    status: str
    reply: str


@dataclass(frozen=True)
class DeliveryOptions:
    """What an agent needs to know about the message beyond its addresses and text."""

    queue_id: str = ""  # for the agent's own log lines
    smtputf8: bool = False  # SMTPUTF8 was asked for on MAIL (mta/delivery/smtputf8.py)


NO_OPTIONS = DeliveryOptions()


class Agent(Protocol):
    def deliver(self, sender: str, recipients: list[str], message: StoredMessage,
                options: DeliveryOptions = NO_OPTIONS) -> dict[str, Outcome]: ...

    def close_idle(self, everything: bool = False) -> None:
        """Close kept sessions idle too long (all of them with `everything`)."""
