"""A milter whose whole work is one check of the finished message against the policy in
force (auth, attachments): the shared pymilter side and the daemon loop."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

from .adapter import MilterLogic, run_milter
from .edits import EomResult
from .message import Message
from .policy.document import Policy
from .policy.holder import PolicyHolder


class Checker(Protocol):
    def check(self, message: Message, policy: Policy) -> EomResult: ...


class CheckerLogic(MilterLogic):
    """Subclasses set name, actions, macros (and exact_headers or reads_body)."""

    def __init__(self, checker: Checker, holder: PolicyHolder[Policy]) -> None:
        self.checker = checker
        self.holder = holder

    def on_message(self, message: Message) -> EomResult:
        return self.checker.check(message, self.holder.current)


def serve_checker(logic_class: type[CheckerLogic], make_checker: Callable[[], Checker],
                  policy_path: Path, listen: str,
                  load_policy: Callable[[Path], Policy]) -> None:
    """Run the milter until SIGTERM; SIGHUP or an edit of the policy file reloads it. A
    broken policy at start raises ConfigError: the milter refuses to start."""
    holder = PolicyHolder(policy_path, load_policy)
    checker = make_checker()
    run_milter(logic_class, lambda: logic_class(checker, holder), listen,
               on_tick=holder.reload_if_changed, on_hangup=lambda: holder.reload("SIGHUP"),
               tick=1.0)
