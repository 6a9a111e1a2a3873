"""The attachments milter daemon: the shared checker milter over logic.AttachmentsChecker.
Copies and password notices go to the config's re-injection listener
(gateway.reinject_listen): serve's own, or behind Postfix a port without milters."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from milters.core.checker_milter import CheckerLogic, serve_checker
from milters.core.config import GatewayConfig
from milters.core.milter_protocol import ActionFlag, MacroStage
from milters.core.policy.document import Policy

from .logic import AttachmentsChecker


class AttachmentsLogic(CheckerLogic):
    name = "attachments"
    # Replace the body and the MIME headers, strip the subject keyword, add the loop guard,
    # and take the recipients whose copy was re-injected off the original.
    actions = (ActionFlag.ADDHDRS | ActionFlag.CHGHDRS | ActionFlag.CHGBODY
               | ActionFlag.DELRCPT)
    spool_body = True  # a 20 MB attachment must not be held in memory several times
    macros = {
        MacroStage.ENVFROM: ("i", "{auth_authen}"),
        MacroStage.EOM: ("i",),
    }


def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    serve_checker(AttachmentsLogic,
                  lambda: AttachmentsChecker(config.hostname, config.reinject_listen),
                  config.policy, listen, load_policy)
