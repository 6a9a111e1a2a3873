"""`mailmoat user add|delete|list` for console accounts (console.users_file): the path
taken when --role (add) or --console (delete) is given; SMTP AUTH users keep the rest."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from milters.core.config import GatewayConfig
from milters.core.errors import MailmoatError
from mta.console.accounts import load_accounts, remove_account, set_account
from .usage import UsageError


def add_or_delete(config: GatewayConfig, args: argparse.Namespace,
                  read_password: Callable[[], str]) -> None:
    path = config.console.users_file
    try:
        if args.user_command == "add":
            account = set_account(path, args.name, args.role, args.address or [],
                                  read_password())
            owned = ", ".join(sorted(account.addresses)) or "no addresses"
            print(f"console account {args.name}: {account.role}, {owned}, password set "
                  f"({path})")
        elif remove_account(path, args.name):
            print(f"console account {args.name}: deleted ({path})")
        else:
            raise MailmoatError(f"console account {args.name}: no such account ({path})")
    except ValueError as exc:
        raise UsageError(f"console account {args.name!r}: {exc}") from None
    except OSError as exc:
        raise MailmoatError(f"{exc.filename or path}: {exc.strerror or exc}") from None


def list_lines(config: GatewayConfig) -> list[str]:
    """One `NAME<TAB>console:ROLE<TAB>ADDRESSES` line per console account."""
    path: Path = config.console.users_file
    return [f"{a.name}\tconsole:{a.role}\t{','.join(sorted(a.addresses))}".rstrip("\t")
            for a in load_accounts(path).values()]
