"""The console's local accounts file (console.users_file), one account a line:

    NAME:ROLE:ADDRESS,ADDRESS:$scrypt$ln=14,r=8,p=1$SALT$HASH

ROLE is admin, auditor or user; ADDRESSES (maybe empty) are the mail a `user` may see.
Blank lines and `#` comments are allowed. It is read at every login (a few lines: nothing
next to one scrypt), so `mailmoat user add --role` takes effect without a restart. The file
holds password hashes: mode 0600, refused when others may read it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from milters.core.errors import ConfigError
from milters.core.secrets import world_readable
from mta.console.identity import ROLES
from mta.passwords import PasswordHash, hash_password, parse_hash
from mta.smtp_in.users import _locked_dir, _write_atomically, check_user_name

# A plain addr-spec: what a `user` role is matched on (exactly, lower-cased).
_ADDRESS = re.compile(r"[^\s@:,\"<>()\[\]\\]{1,64}@[A-Za-z0-9.-]{1,253}")


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    addresses: frozenset[str]
    password: PasswordHash


def check_address(address: str) -> str:
    """The address lower-cased; ValueError unless it is a plain local@domain."""
    if not _ADDRESS.fullmatch(address) or any(ord(ch) < 32 or ord(ch) == 127 for ch in address):
        raise ValueError(f"{address!r} is not a plain mail address (local@domain)")
    return address.lower()


def account_addresses(name: str, role: str, addresses: list[str]) -> frozenset[str]:
    """The addresses an account gets: --address values, else the name when it is an
    address; a `user` with none could see nothing, so that is refused."""
    checked = [check_address(a) for a in addresses]
    if not checked and _ADDRESS.fullmatch(name):
        checked = [name.lower()]
    if role == "user" and not checked:
        raise ValueError("a user-role account needs --address ADDRESS (or a name that is a "
                         "mail address): it sees only mail to or from its addresses")
    return frozenset(checked)


def _read_lines(path: Path) -> list[str] | None:
    try:
        with path.open("rb") as handle:
            problem = world_readable(os.fstat(handle.fileno()).st_mode)
            data = handle.read() if problem is None else b""
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if problem is not None:
        raise ConfigError([f"{path}: the console accounts file {problem}; run "
                           f"'chmod 600 {path}'"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return text.splitlines()


def _parse(lines: list[str], path: Path) -> dict[str, tuple[int, Account]]:
    accounts: dict[str, tuple[int, Account]] = {}
    problems = []
    for index, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{index + 1}"
        parts = text.split(":")
        if len(parts) != 4:
            problems.append(f"{where}: expected NAME:ROLE:ADDRESSES:HASH (a line written by "
                            "`mailmoat user add NAME --role ROLE`)")
            continue
        name, role, addresses, hashed = parts
        try:
            check_user_name(name)
            if role not in ROLES:
                raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
            owned = frozenset(check_address(a) for a in addresses.split(",") if a)
            account = Account(name, role, owned, parse_hash(hashed))
        except ValueError as exc:
            problems.append(f"{where}: account {name!r}: {exc}")
            continue
        if name in accounts:
            problems.append(f"{where}: account {name!r} appears again "
                            f"(first on line {accounts[name][0] + 1})")
            continue
        accounts[name] = (index, account)
    if problems:
        raise ConfigError(problems)
    return accounts


def load_accounts(path: Path) -> dict[str, Account]:
    """name -> Account; {} when the file does not exist (LDAP-only consoles)."""
    lines = _read_lines(Path(path))
    if lines is None:
        return {}
    return {name: account for name, (_, account) in _parse(lines, Path(path)).items()}


def set_account(path: Path, name: str, role: str, addresses: list[str], password: str) -> Account:
    """Add the account or replace its role, addresses and password."""
    path = Path(path)
    check_user_name(name)
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not password:
        raise ValueError("the password must not be empty")
    owned = account_addresses(name, role, addresses)
    hashed = hash_password(password)
    line = f"{name}:{role}:{','.join(sorted(owned))}:{hashed}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked_dir(path.parent):
        lines = _read_lines(path) or []
        accounts = _parse(lines, path)
        if name in accounts:
            lines[accounts[name][0]] = line
        else:
            lines.append(line)
        _write_atomically(path, lines)
    return Account(name, role, owned, parse_hash(hashed))


def remove_account(path: Path, name: str) -> bool:
    """Remove the account; False when there is none (the file is then untouched)."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    with _locked_dir(path.parent):
        lines = _read_lines(path)
        accounts = {} if lines is None else _parse(lines, path)
        if name not in accounts or lines is None:
            return False
        del lines[accounts[name][0]]
        _write_atomically(path, lines)
    return True
