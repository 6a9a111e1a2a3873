"""`mailmoat serve`: the whole gateway in one command, like Postfix's master in small.

It checks the policy, recovers the queue, starts one process per built-in milter on a unix
socket (restarting any that dies), listens for SMTP and for re-injection, runs delivery
every second, and on SIGTERM or SIGINT stops the listeners, lets running work end and stops
the milters.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable

from milters.core.config import GatewayConfig, MilterSetting
from milters.core.errors import MailmoatError
from milters.core.eventlog import log_event
from milters.core.policy.document import Policy
from milters.core.policy.matching import parse_network_pattern

from .deliverer import deliver_due
from .delivery import Agent, MaildirDelivery, Router, SmtpRelay
from .listener import start_listener
from .metrics import METRICS, serve_metrics
from .milter_chain import ChainMember, ChainSession
from .milter_client import MilterEndpoint
from .queue import Queue
from .smtpd import GatewayHandler, SmtpSettings, server_tls_context

PR_SET_PDEATHSIG = 1
_SMTP_TARGET = re.compile(r"^smtp:\[?([^\]]+?)\]?(?::(\d+))?$")
LOOPBACK = (parse_network_pattern("127.0.0.0/8"), parse_network_pattern("::1/128"))


def agent_for(target: str, helo: str) -> Agent:
    if target.startswith("maildir:"):
        return MaildirDelivery(Path(target[len("maildir:"):]))
    match = _SMTP_TARGET.match(target)
    if not match:
        raise ValueError(f"relay target '{target}' is not smtp:[host]:port or maildir:DIR")
    return SmtpRelay(match.group(1), int(match.group(2) or 25), helo=helo)


def build_router(config: GatewayConfig) -> Router:
    return Router(agent_for(config.relay_default, config.hostname),
                  {domain: agent_for(target, config.hostname)
                   for domain, target in config.relay_routes.items()})


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _die_with_parent() -> None:
    """In the child, before exec: Linux's PR_SET_PDEATHSIG, so that a `serve` killed with
    SIGKILL leaves no orphaned milter holding its socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class MilterSupervisor:
    """One child process per built-in milter; a dead one is restarted and logged."""

    def __init__(self, config: GatewayConfig, config_path: str | None) -> None:
        self.config, self.config_path = config, config_path
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def socket_of(self, milter: MilterSetting) -> str:
        return milter.socket or f"unix:{(self.config.run_dir / f'{milter.name}.sock').resolve()}"

    def members(self) -> list[ChainMember]:
        return [ChainMember(MilterEndpoint(m.name, self.socket_of(m)), m.on_failure)
                for m in self.config.milters]

    def _spawn(self, milter: MilterSetting) -> None:
        path = self.config.run_dir / f"{milter.name}.sock"
        path.unlink(missing_ok=True)
        command = [sys.executable, "-m", "mta.cli", "milter", milter.name,
                   "--listen", self.socket_of(milter)]
        if self.config_path:
            command += ["--config", self.config_path]
        # Logs go to our stderr; the child gets SIGTERM if we die, even by SIGKILL.
        self.children[milter.name] = subprocess.Popen(command, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 15
        while not path.exists():
            if self.children[milter.name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"milter {milter.name} did not start")
            time.sleep(0.05)
        log_event("milter_process_started", milter=milter.name,
                  pid=self.children[milter.name].pid, listen=self.socket_of(milter))

    def start(self) -> None:
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        for milter in self.config.milters:
            if milter.socket is None:
                self._spawn(milter)

    def check(self) -> None:
        for milter in self.config.milters:
            child = self.children.get(milter.name)
            if child is not None and child.poll() is not None:
                log_event("milter_process_died", level=logging.ERROR, milter=milter.name,
                          status=child.returncode, action="restarting")
                try:
                    self._spawn(milter)
                except RuntimeError as exc:
                    log_event("milter_restart_failed", level=logging.ERROR,
                              milter=milter.name, error=str(exc))

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        for name, child in self.children.items():
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
            log_event("milter_process_stopped", milter=name)


async def _listen(address: str, setting: str, opening: Awaitable[asyncio.Server]
                  ) -> asyncio.Server:
    """Open a listener, or stop with a message that names the setting to change."""
    try:
        return await opening
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise MailmoatError(f"cannot listen on {address} (gateway.{setting}): {reason}"
                            ) from None


async def _run(config: GatewayConfig, policy: Policy, supervisor: MilterSupervisor,
               queue: Queue) -> None:
    tls = (server_tls_context(str(config.tls_cert), str(config.tls_key))
           if config.tls_cert and config.tls_key else None)
    settings = SmtpSettings(hostname=config.hostname, internal_networks=policy.internal_networks,
                            relay_domains=config.relay_domains,
                            xclient_networks=config.xclient_hosts,
                            max_message_size=config.max_message_size,
                            max_recipients=config.max_recipients,
                            max_connections=config.max_connections,
                            max_connections_per_ip=config.max_connections_per_ip,
                            tls_context=tls, valid_recipients=config.valid_recipients)
    members = supervisor.members()
    chain: Callable[[], ChainSession] | None = (lambda: ChainSession(members)) if members else None
    main = await _listen(config.listen, "listen",
                         start_listener(GatewayHandler(settings, queue, chain),
                                        *split_hostport(config.listen)))
    reinject_settings = SmtpSettings(hostname=config.hostname, internal_networks=LOOPBACK,
                                     max_message_size=config.max_message_size,
                                     max_recipients=config.max_recipients, loopback_only=True)
    reinject = await _listen(config.reinject_listen, "reinject_listen",
                             start_listener(GatewayHandler(reinject_settings, queue, None),
                                            *split_hostport(config.reinject_listen)))
    metrics = None
    if config.metrics_listen:
        METRICS.gauge("mailmoat_queue_messages", lambda: float(len(queue.entries())))
        metrics = await _listen(config.metrics_listen, "metrics_listen",
                                serve_metrics(*split_hostport(config.metrics_listen)))
    log_event("serve_started", listen=config.listen, reinject=config.reinject_listen,
              metrics=config.metrics_listen or None,
              milters=",".join(m.name for m in config.milters) or "none",
              relay=config.relay_default)
    router = build_router(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        await loop.run_in_executor(None, lambda: deliver_due(queue, router, config.queue,
                                                             config.hostname))
        supervisor.check()
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
    for server in (main, reinject, metrics):
        if server is not None:
            server.close()
            await server.wait_closed()


def serve(config: GatewayConfig, config_path: str | None,
          load_policy: Callable[[Path], Policy]) -> int:
    policy = load_policy(config.policy)  # a broken policy stops us here, with its errors
    queue = Queue(config.queue.dir)
    for queue_id in queue.recover():
        log_event("recovered_incomplete", queue_id=queue_id, action="removed (never accepted)")
    supervisor = MilterSupervisor(config, config_path)
    try:
        supervisor.start()
        asyncio.run(_run(config, policy, supervisor, queue))
    finally:
        supervisor.stop()
        log_event("serve_stopped", pid=os.getpid())
    return 0
