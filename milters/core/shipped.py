"""The files mailmoat ships inside its packages (policies, notice templates), found through
importlib.resources: where the package is, not where the checkout was, so an installed wheel
finds them in site-packages as the checkout finds them beside the code."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped_dir(package: str, name: str) -> Path:
    """`package`'s data directory `name` as a real path: the policy loader and the error
    messages need one (a package imported from a zip has none, and mailmoat is never zipped)."""
    found = files(package) / name
    if not isinstance(found, Path):
        raise RuntimeError(f"{package}: installed as an archive ({found}); mailmoat needs its "
                           "package data as files (install the wheel with pip)")
    return found


def shipped_policy(name: str = "default.yaml") -> Path:
    """One of the example policies (milters/policies/), e.g. the embedded default."""
    return shipped_dir("milters", "policies") / name
