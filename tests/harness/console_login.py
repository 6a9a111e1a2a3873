"""A stand-in for mta/console/login.py's authenticate with its settings and Store bound: a
fixed table of accounts, the real Actor and the real LoginRefused / LoginThrottled, so the
web layer's handling of each is tested fast and without scrypt (tests/unit/
test_console_login.py tests the real one; test_console_web_serve.py logs in through it)."""
from __future__ import annotations

from milters.core.errors import LoginRefused, LoginThrottled
from mta.console.identity import Actor
from mta.console.login import WRONG

ACCOUNTS = {  # name -> (password, role, addresses)
    "alice": ("alice-pass-2026", "admin", frozenset()),
    "audrey": ("audrey-pass-2026", "auditor", frozenset()),
    "taro@example.jp": ("taro-pass-2026", "user", frozenset({"taro@example.jp"})),
}


class StandInLogin:
    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []  # (name, source): never the password

    def __call__(self, name: str, password: str, source: str) -> Actor:
        self.calls.append((name, source))
        if self.failures.get(name, 0) >= 5:
            raise LoginThrottled(60.0)
        account = ACCOUNTS.get(name)
        if account is None or account[0] != password:
            self.failures[name] = self.failures.get(name, 0) + 1
            raise LoginRefused(WRONG, "stand-in: wrong password or no such account")
        return Actor(name, account[1], account[2], source)
