"""The auth milter daemon: the shared checker milter over checker.AuthChecker."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from milters.core.checker_milter import CheckerLogic, serve_checker
from milters.core.config import GatewayConfig
from milters.core.dns import Resolver
from milters.core.edits import EomResult
from milters.core.message import Message, header_section
from milters.core.milter_protocol import ActionFlag, MacroStage
from milters.core.policy.document import Policy
from milters.core.store import open_gateway_store

from .body_hash import BodyHashes, SignedParts, wanted_keys
from .checker import AuthChecker
from .settings import MILTER, AuthSettings


class AuthLogic(CheckerLogic):
    name = "auth"
    # Add our header, delete forged ones, hold (quarantine) what DMARC says to.
    actions = ActionFlag.ADDHDRS | ActionFlag.CHGHDRS | ActionFlag.QUARANTINE
    exact_headers = True  # DKIM's simple canonicalization hashes the space after the colon
    macros = {
        MacroStage.ENVFROM: ("i", "{auth_authen}"),
        MacroStage.EOM: ("i",),
    }
    checker: AuthChecker
    # This message's policy and signed parts, from its header section to its end.
    _pending: tuple[Policy, SignedParts] | None = None

    def body_sink(self, headers: list[tuple[str, str]],
                  leading_space: bool) -> Callable[[bytes], None]:
        """The body is hashed as it comes, for the signatures in the header section, and
        never kept: a message costs its header section here, whatever its size and however
        many arrive at once (issue 13 section 4). The policy in force now judges this
        message, so the hashes made are those of the signatures it checks."""
        policy = self.holder.current
        settings: AuthSettings = policy.sections[MILTER]
        head = header_section(headers, leading_space)
        signed = SignedParts(head, BodyHashes(wanted_keys(head, settings.max_signatures)))
        self._pending = (policy, signed)
        return signed.body.feed

    def on_message(self, message: Message) -> EomResult:
        if self._pending is None:  # a whole message handed over (no milter in between)
            return self.checker.check(message, self.holder.current)
        (policy, signed), self._pending = self._pending, None
        return self.checker.check(message, policy, signed)

def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    # The store only tallies DMARC results for reports; the backend connects lazily.
    serve_checker(AuthLogic, lambda: AuthChecker(
        config.hostname, Resolver(config.dns),
        store=open_gateway_store(config)),
        config.policy, listen, load_policy)
