"""The auth milter daemon: the shared checker milter over checker.AuthChecker."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from milters.core.checker_milter import CheckerLogic, serve_checker
from milters.core.config import GatewayConfig
from milters.core.dns import Resolver
from milters.core.milter_protocol import ActionFlag, MacroStage
from milters.core.policy.document import Policy
from milters.core.store import open_gateway_store

from .checker import AuthChecker


class AuthLogic(CheckerLogic):
    name = "auth"
    # Add our header, delete forged ones, hold (quarantine) what DMARC says to.
    actions = ActionFlag.ADDHDRS | ActionFlag.CHGHDRS | ActionFlag.QUARANTINE
    exact_headers = True  # DKIM's simple canonicalization hashes the space after the colon
    macros = {
        MacroStage.ENVFROM: ("i", "{auth_authen}"),
        MacroStage.EOM: ("i",),
    }


def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    # The store only tallies DMARC results for reports; the backend connects lazily.
    serve_checker(AuthLogic, lambda: AuthChecker(
        config.hostname, Resolver(config.dns),
        store=open_gateway_store(config)),
        config.policy, listen, load_policy)
