"""Who is acting in the console or the CLI: the Actor every operation is given."""
from __future__ import annotations

from dataclasses import dataclass

from milters.core.config_console import CONSOLE_ROLES

ROLES = CONSOLE_ROLES  # admin: everything; auditor: read everything; user: own mail only


@dataclass(frozen=True)
class Actor:
    name: str  # login name ("alice"), or "cli:root" for the command line
    role: str  # "admin" | "auditor" | "user"
    addresses: frozenset[str]  # lower-cased mail addresses this person owns (role user)
    source: str  # the client's IP address, or "cli"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
