"""Run a command that will drop to another user, where that user can still start Python.

Here the Python lives under /root (pyenv), which is 0700: once `serve` drops to `nobody` it
could not start its milters. The command runs in a private mount namespace (like
isolated.py) where a tmpfs (0755) covers the closed directory and holds only a bind of the
part of it that leads to Python. The host and every other process are untouched. Where the
Python is reachable anyway (a system Python), the command runs as it is.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from .isolated import UNSHARE

_REBIND = ('mkdir -p "$1" && mount --bind "$2/$3" "$1" && '
           'mount -t tmpfs -o mode=0755 mailmoat-test "$2" && mkdir -p "$2/$3" && '
           'mount --bind "$1" "$2/$3" && shift 3 && exec "$@"')


def _closed_ancestor(path: Path) -> tuple[Path, str] | None:
    """The first directory on the way to `path` that others cannot pass, and the name of
    its child on that way."""
    for parent in reversed(path.parents[:-1]):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent, path.relative_to(parent).parts[0]
    return None


def reachable_argv(argv: list[str], scratch: Path) -> list[str]:
    closed = _closed_ancestor(Path(sys.base_prefix).resolve())
    if closed is None:
        return argv
    directory, child = closed
    keep = scratch / "python-kept"
    return [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", _REBIND, "sh",
            str(keep), str(directory), child, *argv]
