"""The sign milter daemon: last in the chain, it hashes the body as it streams past (never
holding it) and adds DKIM-Signature fields, only ADDHDRS."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from milters.core.checker_milter import CheckerLogic, serve_checker
from milters.core.config import GatewayConfig
from milters.core.edits import EomResult
from milters.core.message import Envelope, Message
from milters.core.milter_protocol import ActionFlag, MacroStage
from milters.core.policy.document import Policy
from milters.core.verdict import Verdict

from .logic import Pending, Signer


class SignLogic(CheckerLogic):
    name = "sign"
    actions = ActionFlag.ADDHDRS  # DKIM-Signature fields at the top; nothing else changes
    exact_headers = True  # simple canonicalization hashes the space after the colon
    quiet_stages = frozenset({"mail"})  # on_mail only keeps the envelope: no round trip
    macros = {
        MacroStage.ENVFROM: ("i", "{auth_authen}"),
        MacroStage.EOM: ("i",),
    }
    checker: Signer
    _env: Envelope | None = None
    _pending: Pending | None = None

    def on_mail(self, env: Envelope) -> Verdict:
        self._env = env  # the adapter's envelope: complete (recipients too) by the headers
        return Verdict.cont()

    def body_sink(self, headers: list[tuple[str, str]],
                  leading_space: bool) -> Callable[[bytes], None]:
        """Planned when the header section is complete, under the policy in force now; the
        body is hashed as it comes (only when a key will sign) and never kept."""
        self._pending = self.checker.start(self.holder.current, self._env or Envelope(),
                                           headers, leading_space)
        body = self._pending.body
        return body.feed if body is not None else _ignore

    def on_message(self, message: Message) -> EomResult:
        if self._pending is None:  # a whole message handed over (no milter in between)
            return self.checker.sign_message(self.holder.current, message)
        pending, self._pending = self._pending, None
        return self.checker.finish(pending, message.envelope)


def _ignore(chunk: bytes) -> None:
    """The body of a message nothing signs."""


def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    # The auth milter writes its Authentication-Results under the gateway's hostname; ARC
    # sealing copies that header, and only that one.
    serve_checker(SignLogic, lambda: Signer(config.hostname), config.policy, listen,
                  load_policy)
