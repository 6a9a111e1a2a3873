"""The attachments milter daemon: a thin pymilter adapter over logic.AttachmentsChecker."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from milters.core.adapter import MilterLogic, run_milter
from milters.core.config import GatewayConfig
from milters.core.edits import EomResult
from milters.core.message import Message
from milters.core.milter_protocol import ActionFlag, MacroStage
from milters.core.policy.document import Policy
from milters.core.policy.holder import PolicyHolder

from .logic import AttachmentsChecker


class AttachmentsLogic(MilterLogic):
    name = "attachments"
    # Replace the body and the MIME headers, strip the subject keyword, add the loop guard,
    # and take the recipients whose copy was re-injected off the original.
    actions = (ActionFlag.ADDHDRS | ActionFlag.CHGHDRS | ActionFlag.CHGBODY
               | ActionFlag.DELRCPT)
    macros = {
        MacroStage.ENVFROM: ("i", "{auth_authen}"),
        MacroStage.EOM: ("i",),
    }

    def __init__(self, checker: AttachmentsChecker, holder: PolicyHolder) -> None:
        self.checker = checker
        self.holder = holder

    def on_message(self, message: Message) -> EomResult:
        return self.checker.check(message, self.holder.current)


def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    """Run the milter until SIGTERM; SIGHUP or an edit of the policy file reloads it.
    Copies and password notices go to the config's re-injection listener
    (gateway.reinject_listen): ours, or behind Postfix a port without milters."""
    holder = PolicyHolder(config.policy, load_policy)  # raises ConfigError: refuse to start
    checker = AttachmentsChecker(config.hostname, config.reinject_listen)
    run_milter(AttachmentsLogic, lambda: AttachmentsLogic(checker, holder), listen,
               on_tick=holder.reload_if_changed, on_hangup=lambda: holder.reload("SIGHUP"),
               tick=1.0)
