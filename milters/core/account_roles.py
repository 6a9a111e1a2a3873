"""Who holds a console role, for milters (a review rule's `role:admin` approvers): read
from the console's accounts file (console.users_file, written by `mailmoat user add`) without
importing the console. Only the first three fields of a line are read, never the hash:

    NAME:ROLE:ADDRESS,ADDRESS:HASH
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

MAX_BYTES = 4 * 1024 * 1024  # a users file is a few lines; more is not one


def role_addresses(path: Path, role: str) -> list[str]:
    """The addresses of every account with `role`, in file order, each once, lower-cased;
    [] when the file does not exist. ConfigError when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError([f"console.users_file {path}: cannot read it: "
                           f"{exc.strerror or exc}"]) from None
    if len(data) > MAX_BYTES:
        raise ConfigError([f"console.users_file {path}: larger than {MAX_BYTES} bytes"])
    found: dict[str, None] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 3)
        if len(parts) == 4 and parts[1] == role:
            for address in parts[2].split(","):
                address = address.strip().lower()
                if "@" in address and not any(c.isspace() or ord(c) < 32 for c in address):
                    found.setdefault(address, None)
    return list(found)
