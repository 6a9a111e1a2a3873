"""The ratelimit milter daemon: a thin pymilter adapter over limiter.Session."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from milters.core.adapter import MilterLogic, run_milter
from milters.core.config import GatewayConfig
from milters.core.auth_results import trusted_results
from milters.core.eventlog import log_event
from milters.core.edits import EomResult
from milters.core.message import Envelope, Message, Recipient
from milters.core.milter_protocol import MacroStage
from milters.core.policy.document import Policy
from milters.core.policy.holder import PolicyHolder
from milters.core.store import open_gateway_store
from milters.core.verdict import Verdict

from .limiter import MILTER, RateLimiter, Session


class RatelimitLogic(MilterLogic):
    name = "ratelimit"
    rejected_recipients = True  # rejected RCPTs are a spam signal (SMFIP_RCPT_REJ)
    # Connect is only observed (its verdicts are due at MAIL FROM): the MTA need not wait.
    quiet_stages = frozenset({"connect"})
    macros = {
        MacroStage.ENVFROM: ("i", "{auth_authen}"),
        MacroStage.ENVRCPT: ("i", "{rcpt_mailer}"),
    }

    def __init__(self, session: Session) -> None:
        self.session = session

    def on_connect(self, env: Envelope) -> Verdict:
        return self.session.on_connect(env)

    def on_mail(self, env: Envelope) -> Verdict:
        return self.session.on_mail(env)

    def on_rcpt(self, env: Envelope, rcpt: Recipient) -> Verdict:
        return self.session.on_rcpt(env, rcpt)

    def on_close(self, env: Envelope) -> None:
        self.session.on_close(env)


class RatelimitAuthLogic(RatelimitLogic):
    """Also reads the auth milter's verdicts at end of message, for the spam points the
    policy gives auth failures (points.auth_results). Headers only, no body: it is a
    separate class so that a policy without such points costs no header traffic at all.
    The auth milter must come before this one in the MTA's milter list."""

    reads_body = False
    macros = {**RatelimitLogic.macros, MacroStage.EOM: ("i",)}
    authserv_id = ""  # set in serve(): the gateway's hostname

    def on_message(self, message: Message) -> EomResult:
        env = message.envelope
        self.session.on_auth_results(env, trusted_results(message.raw_headers(),
                                                          self.authserv_id))
        return EomResult(Verdict.cont())


def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    """Run the milter until SIGTERM; SIGHUP or an edit of the policy file reloads it."""
    holder = PolicyHolder(config.policy, load_policy)  # raises ConfigError: refuse to start
    limiter = RateLimiter(open_gateway_store(config))

    limiter.start_writer(lambda: holder.current.sections[MILTER])
    logic: type[RatelimitLogic] = RatelimitLogic
    if holder.current.sections[MILTER].points.auth_results:
        # Decided once: the steps a milter takes are negotiated per connection from its
        # class. A reload that adds auth_results needs a restart (logged at reload).
        logic = type("RatelimitAuthLogic", (RatelimitAuthLogic,),
                     {"authserv_id": config.hostname})
    warned: list[Policy] = []

    def warn_if_restart_needed() -> None:
        policy = holder.current
        if (policy.sections[MILTER].points.auth_results and logic is RatelimitLogic
                and not any(seen is policy for seen in warned)):
            warned.append(policy)
            log_event("restart_needed", level=logging.WARNING, milter=MILTER,
                      reason="points.auth_results was added: restart this milter so that "
                             "it reads the auth milter's verdicts")

    def tick() -> None:
        holder.reload_if_changed()
        warn_if_restart_needed()

    def hangup() -> None:
        holder.reload("SIGHUP")
        warn_if_restart_needed()

    try:
        run_milter(logic, lambda: logic(limiter.session(holder.current)),
                   listen, on_tick=tick, on_hangup=hangup, tick=1.0)
    finally:
        limiter.stop_writer(holder.current.sections[MILTER])  # counted mail outlives us
