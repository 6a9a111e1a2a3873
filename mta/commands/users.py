"""`mailmoat user add|delete|list`: SMTP AUTH users (gateway.auth.users_file) and, with
--role or --console, the console's accounts (mta/commands/console_users.py)."""
from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from milters.core.config import GatewayConfig, load_config
from milters.core.config_console import CONSOLE_ROLES
from milters.core.errors import MailmoatError

from mta.smtp_in import users
from . import console_users
from .usage import UsageError


def add_parser(sub: argparse._SubParsersAction, parser_class: type, config_help: str
               ) -> None:
    user = sub.add_parser("user", help="manage SMTP AUTH users (gateway.auth.users_file) and "
                                       "console accounts (console.users_file, with --role)")
    usub = user.add_subparsers(dest="user_command", required=True, parser_class=parser_class)
    for name, text, needs_name in (
            ("add", "add a user or change a password (read from stdin when piped)", True),
            ("delete", "remove a user", True),
            ("list", "print every user name (console accounts with their roles)", False)):
        command = usub.add_parser(name, help=text)
        if needs_name:
            command.add_argument("name", metavar="NAME")
        if name == "add":
            command.add_argument("--role", choices=CONSOLE_ROLES,
                                 help="a console account with this role (not an SMTP user)")
            command.add_argument("--address", action="append", metavar="ADDRESS",
                                 help="a console account's own mail address (repeatable)")
        if name == "delete":
            command.add_argument("--console", action="store_true",
                                 help="delete the console account, not the SMTP user")
        command.add_argument("--config", metavar="FILE", help=config_help)
        command.set_defaults(func=run)


def _users_file(config: GatewayConfig) -> Path:
    if config.auth_users_file is None:
        where = "give --config FILE and set" if config.source == "(embedded defaults)" else "add"
        raise MailmoatError(f"{config.source}: no SMTP AUTH users file configured; {where} "
                            "gateway.auth.users_file (e.g. `auth: {users_file: var/users}` "
                            "under gateway:)")
    return config.auth_users_file


def _read_new_password() -> str:
    """First line of stdin when it is piped (scripts), else asked twice without echo."""
    if sys.stdin.isatty():
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("the passwords do not match; nothing changed")
    else:
        try:
            password = sys.stdin.buffer.readline().decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the password on stdin is not UTF-8") from None
        password = password.removesuffix("\n").removesuffix("\r")
    if not password:
        raise UsageError("the password is empty; nothing changed")
    return password


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    action = args.user_command
    if getattr(args, "role", None) or getattr(args, "console", False):  # console accounts
        console_users.add_or_delete(config, args, _read_new_password)
        return 0
    if action == "list":
        console = console_users.list_lines(config)
        names = users.list_users(_users_file(config)) if config.auth_users_file or not console \
            else []
        if names or console:
            print("\n".join(names + console))
        else:
            print(f"{config.auth_users_file}: no users", file=sys.stderr)
        return 0
    if getattr(args, "address", None):
        raise UsageError("--address is for console accounts: add --role admin|auditor|user")
    path = _users_file(config)
    try:
        users.check_user_name(args.name)
    except ValueError as exc:
        raise UsageError(f"user {args.name!r}: {exc}") from None
    try:
        if action == "add":
            users.set_password(path, args.name, _read_new_password())
            print(f"user {args.name}: password set ({path})")
        elif users.remove_user(path, args.name):
            print(f"user {args.name}: deleted ({path})")
        else:
            raise MailmoatError(f"user {args.name}: no such user ({path})")
    except ValueError as exc:  # a password set_password refuses
        raise UsageError(f"user {args.name}: {exc}") from None
    except OSError as exc:
        raise MailmoatError(f"{exc.filename or path}: {exc.strerror or exc}") from None
    return 0
