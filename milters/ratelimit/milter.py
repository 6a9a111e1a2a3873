"""The ratelimit milter daemon: a thin pymilter adapter over limiter.Session."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from milters.core.adapter import MilterLogic, run_milter
from milters.core.config import GatewayConfig
from milters.core.message import Envelope, Recipient
from milters.core.milter_protocol import MacroStage
from milters.core.policy.document import Policy
from milters.core.policy.holder import PolicyHolder
from milters.core.store import open_store
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


def serve(config: GatewayConfig, listen: str,
          load_policy: Callable[[Path], Policy]) -> None:
    """Run the milter until SIGTERM; SIGHUP or an edit of the policy file reloads it."""
    holder = PolicyHolder(config.policy, load_policy)  # raises ConfigError: refuse to start
    limiter = RateLimiter(open_store(config.store, timeout=config.store_timeout))

    limiter.start_writer(lambda: holder.current.sections[MILTER])
    try:
        run_milter(RatelimitLogic, lambda: RatelimitLogic(limiter.session(holder.current)),
                   listen, on_tick=holder.reload_if_changed,
                   on_hangup=lambda: holder.reload("SIGHUP"), tick=1.0)
    finally:
        limiter.stop_writer(holder.current.sections[MILTER])  # counted mail outlives us
