"""The auth milter daemon: a thin pymilter adapter over checker.AuthChecker."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from milters.core.adapter import MilterLogic, run_milter
from milters.core.config import GatewayConfig
from milters.core.dns import Resolver
from milters.core.edits import EomResult
from milters.core.message import Message
from milters.core.milter_protocol import ActionFlag, MacroStage
from milters.core.policy.document import Policy
from milters.core.policy.holder import PolicyHolder
from milters.core.store import open_store

from .checker import AuthChecker


class AuthLogic(MilterLogic):
    name = "auth"
    # Add our header, delete forged ones, hold (quarantine) what DMARC says to.
    actions = ActionFlag.ADDHDRS | ActionFlag.CHGHDRS | ActionFlag.QUARANTINE
    exact_headers = True  # DKIM's simple canonicalization hashes the space after the colon
    macros = {
        MacroStage.ENVFROM: ("i", "{auth_authen}"),
        MacroStage.EOM: ("i",),
    }

    def __init__(self, checker: AuthChecker, holder: PolicyHolder) -> None:
        self.checker = checker
        self.holder = holder

    def on_message(self, message: Message) -> EomResult:
        return self.checker.check(message, self.holder.current)


def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    """Run the milter until SIGTERM; SIGHUP or an edit of the policy file reloads it."""
    holder = PolicyHolder(config.policy, load_policy)  # raises ConfigError: refuse to start
    # The store only tallies DMARC results for reports; it is opened lazily by the backend.
    checker = AuthChecker(config.hostname, Resolver(config.dns),
                          store=open_store(config.store, timeout=config.store_timeout))
    run_milter(AuthLogic, lambda: AuthLogic(checker, holder), listen,
               on_tick=holder.reload_if_changed, on_hangup=lambda: holder.reload("SIGHUP"),
               tick=1.0)
