"""DESIGN.md's house rules on imports, read from the source: `mta` may import `milters.core`
but never an individual milter (only mta/cli.py names milters, to start them); a milter
never imports `mta` or another milter; `milters.core` imports neither."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

MILTERS = sorted(p.name for p in (ROOT / "milters").iterdir()
                 if p.is_dir() and p.name not in ("core", "policies", "__pycache__"))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module an import statement in `path` names (relative ones resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((node.lineno, base))
            # `from milters import sign` names the milter too
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def owner(module: str) -> str | None:
    """'mta', 'milters.core', 'milters.NAME', or None for anything else."""
    parts = module.split(".")
    if parts[0] == "mta":
        return "mta"
    if parts[0] == "milters" and len(parts) > 1:
        return f"milters.{parts[1]}"
    return None


def violations() -> list[str]:
    found = []
    for path in sorted((ROOT / "mta").rglob("*.py")) + sorted((ROOT / "milters").rglob("*.py")):
        here = owner(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, module in imported_modules(path):
            there = owner(module)
            if there is None or there == here:
                continue
            where = f"{path.relative_to(ROOT)}:{line}: imports {module}"
            if here == "mta" and there.startswith("milters.") and there != "milters.core":
                if path != ROOT / "mta" / "cli.py" and there.removeprefix("milters.") in MILTERS:
                    found.append(where)
            elif here == "milters.core" and there != "milters.core":
                if there == "mta" or there.removeprefix("milters.") in MILTERS:
                    found.append(where)
            elif here is not None and here.startswith("milters.") and here != "milters.core":
                if there == "mta" or there.removeprefix("milters.") in MILTERS:
                    found.append(where)
    return found


def test_the_import_rules_hold() -> None:
    assert violations() == []


def test_the_check_sees_a_milter_imported_from_mta() -> None:
    """The check itself can fail: a module of mta that imports a milter is named."""
    planted = ROOT / "mta" / "commands" / "_planted_for_test.py"
    planted.write_text("from milters.sign import keys\nfrom ..queue import spool\n")
    try:
        assert violations() == ["mta/commands/_planted_for_test.py:1: imports milters.sign",
                                "mta/commands/_planted_for_test.py:1: imports milters.sign.keys"]
    finally:
        planted.unlink()
