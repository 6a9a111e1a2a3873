"""Who may do what with held mail (issue 17, "Who may do what").

admin: everything. auditor: reads everything, changes nothing. user: reads only mail where
one of their own addresses is the sender or a recipient, and changes nothing: our holds are
security holds (DMARC quarantine, a milter's quarantine, an admin's hold), not a spam folder
its owner may empty, so a user asks an admin (unlike Proxmox's user spam quarantine).

A message a user may not see raises NotFound with the same text as a missing one, so queue
IDs cannot be probed; an action a role may not take raises Forbidden.
"""
from __future__ import annotations

import os
import pwd
from typing import Protocol

from milters.core.config_console import CONSOLE_ROLES
from milters.core.errors import MailmoatError

from mta.console.identity import Actor

ROLES = CONSOLE_ROLES
CLI_SOURCE = "cli"  # an Actor's source for the command line (a login has an IP address)


class OperationError(MailmoatError):
    """An operation on held mail cannot be done."""


class NotFound(OperationError):
    """No such message, or none this actor may see (the same words for both)."""


class Forbidden(OperationError):
    """This actor's role may not take this action."""


class ActorLike(Protocol):
    """What an operation needs of its caller: mta/console/identity.py's Actor has it."""

    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def addresses(self) -> frozenset[str]: ...
    @property
    def source(self) -> str: ...


def cli_actor() -> Actor:
    """The command line's caller: an admin named cli:USER (the Unix user running it)."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        user = str(os.getuid())
    return Actor(name=f"cli:{user}", role="admin", addresses=frozenset(), source=CLI_SOURCE)


def actor_label(actor: ActorLike) -> str:
    """The audit record's actor: cli:USER for the command line, console:NAME for every
    login. By source, not by name: a console login's source is its client's IP address,
    so a login named "cli:root" stays console:cli:root."""
    return actor.name if actor.source == CLI_SOURCE else f"console:{actor.name}"


def check_role(actor: ActorLike) -> None:
    if actor.role not in ROLES:  # a mapping mistake must never widen access
        raise Forbidden(f"{actor.name}: unknown role {actor.role!r}")


def may_see(actor: ActorLike, sender: str, recipients: list[str]) -> bool:
    check_role(actor)
    if actor.role in ("admin", "auditor"):
        return True
    own = {address.lower() for address in actor.addresses}
    return any(address.lower() in own for address in [sender, *recipients] if address)


def must_change(actor: ActorLike, action: str) -> None:
    """Only an admin releases, deletes, holds or downloads the original."""
    check_role(actor)
    if actor.role != "admin":
        raise Forbidden(f"{actor.name} ({actor.role}) may not {action} held mail")


def not_found(queue_id: str) -> NotFound:
    shown = queue_id if queue_id.isalnum() and len(queue_id) <= 64 else "(not a queue ID)"
    return NotFound(f"no queued message {shown}")
