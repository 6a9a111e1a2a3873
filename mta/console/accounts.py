"""The console's local accounts file (console.users_file), one account a line:

    NAME:ROLE:ADDRESS,ADDRESS:$scrypt$ln=14,r=8,p=1$SALT$HASH

ROLE is admin, auditor or user; ADDRESSES (maybe empty) are the mail a `user` may see.
Blank lines and `#` comments are allowed. It is read at every login (a few lines: nothing
next to one scrypt), so `mailmoat user add --role` takes effect without a restart. The file
holds password hashes: mode 0600, refused when others may read it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mta.console.identity import ROLES
from mta.credential_file import CredentialFile, check_user_name
from mta.passwords import PasswordHash, hash_password, parse_hash

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


def _parse_line(text: str) -> tuple[str, Account]:
    parts = text.split(":", 3)
    if len(parts) != 4:
        raise ValueError("expected NAME:ROLE:ADDRESSES:HASH (a line written by "
                         "`mailmoat user add NAME --role ROLE`)")
    name, role, addresses, hashed = parts
    try:
        check_user_name(name)
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        owned = frozenset(check_address(a) for a in addresses.split(",") if a)
        return name, Account(name, role, owned, parse_hash(hashed))
    except ValueError as exc:
        raise ValueError(f"account {name!r}: {exc}") from None


ACCOUNTS_FILE: CredentialFile[Account] = CredentialFile(
    "the console accounts file", "account", _parse_line, chmod_hint="600")


def load_accounts(path: Path) -> dict[str, Account]:
    """name -> Account; {} when the file does not exist (LDAP-only consoles)."""
    return ACCOUNTS_FILE.load(Path(path)) or {}


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
    ACCOUNTS_FILE.put(path, name, line)
    return Account(name, role, owned, parse_hash(hashed))


def remove_account(path: Path, name: str) -> bool:
    """Remove the account; False when there is none (the file is then untouched)."""
    return ACCOUNTS_FILE.remove(Path(path), name)
