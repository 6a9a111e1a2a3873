"""What every `mailmoat` subcommand shares: the usage error (exit 2), the argument parser
that says so, and the argument types."""
from __future__ import annotations

import argparse
import ipaddress
import sys
from datetime import datetime, timezone

from milters.core.config import STORE_SCHEMES
from milters.core.errors import ConfigError

CONFIG_HELP = "gateway config YAML (default: embedded defaults)"


class UsageError(Exception):
    """A wrong command line: exit 2."""


class CommandParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(problem, file=sys.stderr)


def ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an IP address") from None


def store_url(text: str) -> str:
    if not text.startswith(STORE_SCHEMES):
        raise argparse.ArgumentTypeError(f"'{text}' is not a store URL (memory://, "
                                         "sqlite:///PATH, redis://HOST:PORT/DB)")
    return text


def utc_date(text: str) -> float:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a date like 2026-11-28") from None
