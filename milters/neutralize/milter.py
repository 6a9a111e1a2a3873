"""The neutralize milter daemon: the shared checker milter over logic.NeutralizeChecker.
Run it after the auth milter: it reads that milter's Authentication-Results header (the one
carrying gateway.hostname as its authserv-id) to tell trusted senders from suspicious ones."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from milters.core.checker_milter import CheckerLogic, serve_checker
from milters.core.config import GatewayConfig
from milters.core.milter_protocol import ActionFlag, MacroStage
from milters.core.policy.document import Policy

from .logic import NeutralizeChecker


class NeutralizeLogic(CheckerLogic):
    name = "neutralize"
    # Replace the body and its MIME headers, add the marker, delete forged markers.
    actions = ActionFlag.ADDHDRS | ActionFlag.CHGHDRS | ActionFlag.CHGBODY
    spool_body = True  # a large attachment is decoded from a file, never held whole
    progress_every = 10.0  # LibreOffice may take a while: keep the MTA waiting for us
    macros = {
        MacroStage.ENVFROM: ("i", "{auth_authen}"),
        MacroStage.EOM: ("i",),
    }


def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    serve_checker(NeutralizeLogic, lambda: NeutralizeChecker(config.hostname),
                  config.policy, listen, load_policy)
