"""`mailmoat serve`: the whole gateway in one command, like Postfix's master in small.

It checks the policy, recovers the queue, starts one process per built-in milter on a unix
socket (restarting any that dies), listens for SMTP and for re-injection, runs delivery
every second, and on SIGTERM or SIGINT stops the listeners, lets running work end and stops
the milters. SIGHUP (systemd's ExecReload) reloads the policy, as an edit of its file does:
serve's own part of it (internal_networks, read by the SMTP server for new connections)
here, and each milter's in that milter, to which serve passes the SIGHUP on. A broken edit
keeps the last good policy and logs why.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Awaitable, Callable

from milters.core.config import GatewayConfig, MilterSetting
from milters.core.errors import MailmoatError
from milters.core.eventlog import log_event
from milters.core.policy.document import Policy
from milters.core.policy.holder import PolicyHolder
from milters.core.policy.matching import parse_network_pattern
from milters.core.store import open_gateway_store

from mta.aio.event_loop import loop_factory
from mta.chain.client import MilterEndpoint
from mta.chain.pool import MilterPool
from mta.chain.session import ChainMember, ChainSession
from mta.console.process import ConsoleProcess
from mta.delivery.process import DeliveryProcess
from mta.metrics import METRICS, ReadyCheck, serve_metrics
from mta.queue.spool import Queue
from mta.review.digest_timer import digest_timer
from mta.review.wiring import review_runner
from mta.smtp_in.server import GatewayHandler, SmtpSettings, server_tls_context, smtpd_limits
from mta.smtp_in.users import UserFile
from . import privileges
from .health import Readiness
from .listener import start_listener

PR_SET_PDEATHSIG = 1
LOOPBACK = (parse_network_pattern("127.0.0.0/8"), parse_network_pattern("::1/128"))


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _die_with_parent() -> None:
    """In the child, before exec: Linux's PR_SET_PDEATHSIG, so that a `serve` killed with
    SIGKILL leaves no orphaned milter holding its socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# Restarts never wait on the event loop: a restarted milter makes its socket in its own time
# while SMTP sessions go on (and get its on_failure meanwhile: nothing listens there yet).
RESTART_WAIT = 15.0  # s: a restarted milter with no socket by then is killed and tried again
STABLE_AFTER = 30.0  # s: dying after this long is bad luck; sooner, a milter that cannot run
MAX_THROTTLE = 60.0  # s: the longest wait between restarts (Postfix's service_throttle_time)
SOCKET_POLL = 0.05  # s: how often a starting milter's socket is looked for


class MilterSupervisor:
    """One child process per built-in milter; a dead one is restarted and logged. Like
    Postfix's master, a milter that keeps dying soon after it starts is throttled: its
    restarts wait 1, 2, 4 ... up to 60 seconds."""

    def __init__(self, config: GatewayConfig, config_path: str | None,
                 store: str | None = None) -> None:
        self.config, self.config_path = config, config_path
        self.store = store  # instead of the config file's (scan's throwaway state)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._started_at: dict[str, float] = {}
        self._quick_deaths: dict[str, int] = {}  # deaths in a row, each soon after a start
        self._restarting: dict[str, asyncio.Task[None]] = {}

    def socket_of(self, milter: MilterSetting) -> str:
        return milter.socket or f"unix:{(self.config.run_dir / f'{milter.name}.sock').resolve()}"

    def members(self, reinjection: bool = False) -> list[ChainMember]:
        """The chain of the main listener, or (reinjection) of the re-injection listener:
        the milters configured with `reinjection: true`, in the same order."""
        return [ChainMember(MilterEndpoint(m.name, self.socket_of(m), m.connect_timeout,
                                           m.command_timeout, m.content_timeout),
                            m.on_failure, m.reuses_connection) for m in self.config.milters
                if m.reinjection or not reinjection]

    def _launch(self, milter: MilterSetting) -> subprocess.Popen[bytes]:
        """Start the milter's process (without waiting for its socket)."""
        (self.config.run_dir / f"{milter.name}.sock").unlink(missing_ok=True)
        command = [sys.executable, "-m", "mta.cli", "milter", milter.name,
                   "--listen", self.socket_of(milter)]
        if self.config_path:
            command += ["--config", self.config_path]
        if self.config.user:  # it may come from serve's (or scan's) --user, not the file
            command += ["--user", self.config.user]
        # Where the milters hand mail back: serve's own listener, or scan's catcher.
        command += ["--reinject", self.config.reinject_listen]
        if self.store:
            command += ["--store", self.store]
        # Logs go to our stderr; the child gets SIGTERM if we die, even by SIGKILL.
        child = self.children[milter.name] = subprocess.Popen(command,
                                                              preexec_fn=_die_with_parent)
        self._started_at[milter.name] = time.monotonic()
        return child

    def _spawn(self, milter: MilterSetting) -> None:
        """Start a milter and wait for its socket: at start, before any client is served."""
        child = self._launch(milter)
        path = self.config.run_dir / f"{milter.name}.sock"
        deadline = time.monotonic() + RESTART_WAIT
        while not path.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"milter {milter.name} did not start")
            time.sleep(SOCKET_POLL)
        log_event("milter_process_started", milter=milter.name, pid=child.pid,
                  listen=self.socket_of(milter))

    def start(self) -> None:
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        for milter in self.config.milters:
            if milter.socket is None:
                self._spawn(milter)

    def check(self) -> None:
        """Restart the milters that died. Runs on the event loop: it only looks and
        schedules, the restarts run as tasks of their own."""
        loop = asyncio.get_running_loop()
        for milter in self.config.milters:
            child = self.children.get(milter.name)
            if child is None or milter.name in self._restarting or child.poll() is None:
                continue
            delay = self._throttle(milter.name)
            log_event("milter_process_died", level=logging.ERROR, milter=milter.name,
                      status=child.returncode, action="restarting", delay=f"{delay:g}s")
            task = self._restarting[milter.name] = loop.create_task(
                self._restart(milter, delay))
            task.add_done_callback(lambda _, name=milter.name: self._restarting.pop(name, None))

    def _throttle(self, name: str) -> float:
        """Seconds to wait before restarting `name`: none after a milter that ran a while;
        after each death soon after a start, twice as long as the last time."""
        if time.monotonic() - self._started_at.get(name, 0.0) >= STABLE_AFTER:
            self._quick_deaths[name] = 0
        deaths = self._quick_deaths[name] = self._quick_deaths.get(name, 0) + 1
        return 0.0 if deaths == 1 else min(2.0 ** (deaths - 2), MAX_THROTTLE)

    async def _restart(self, milter: MilterSetting, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        child = self._launch(milter)
        path = self.config.run_dir / f"{milter.name}.sock"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESTART_WAIT
        while not path.exists():
            if child.poll() is not None:
                error = f"exited with status {child.returncode} before making its socket"
                break
            if loop.time() > deadline:
                child.kill()  # stuck: the next check() finds it dead and tries again
                error = f"no socket within {RESTART_WAIT:g}s; killed"
                break
            await asyncio.sleep(SOCKET_POLL)
        else:
            log_event("milter_process_started", milter=milter.name, pid=child.pid,
                      listen=self.socket_of(milter))
            return
        log_event("milter_restart_failed", level=logging.ERROR, milter=milter.name,
                  pid=child.pid, error=error)

    def hangup(self) -> None:
        """Pass a SIGHUP on: each milter reloads its policy (milters/core/adapter.py)."""
        for name, child in self.children.items():
            if child.poll() is None:
                child.send_signal(signal.SIGHUP)
                log_event("milter_hangup_sent", milter=name, pid=child.pid)

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
            try:  # killed, it could not remove its socket itself
                (self.config.run_dir / f"{name}.sock").unlink(missing_ok=True)
            except OSError:
                pass  # a run_dir serve may no longer write after dropping root
            log_event("milter_process_stopped", milter=name)


def server_tls(config: GatewayConfig) -> ssl.SSLContext | None:
    """The STARTTLS context of the main listener (gateway.tls); None: STARTTLS not offered."""
    if config.tls_cert and config.tls_key:
        return server_tls_context(str(config.tls_cert), str(config.tls_key))
    return None


def user_file(config: GatewayConfig) -> UserFile | None:
    """The SMTP AUTH users (gateway.auth.users_file); None: AUTH is not offered."""
    return UserFile(config.auth_users_file) if config.auth_users_file else None


def smtp_settings(config: GatewayConfig, policy: Policy, users: UserFile | None,
                  tls: ssl.SSLContext | None) -> SmtpSettings:
    """The main listener's settings: every gateway key the SMTP server reads."""
    return SmtpSettings(hostname=config.hostname, internal_networks=policy.internal_networks,
                        relay_domains=config.relay_domains,
                        xclient_networks=config.xclient_hosts,
                        max_message_size=config.max_message_size,
                        max_recipients=config.max_recipients,
                        max_connections=config.max_connections,
                        max_connections_per_ip=config.max_connections_per_ip,
                        tls_context=tls, valid_recipients=config.valid_recipients,
                        users=users, **smtpd_limits(config.smtpd))


def reinject_smtp_settings(config: GatewayConfig) -> SmtpSettings:
    """The re-injection listener's: loopback only (the milters' notices and split copies),
    with the main listener's size and recipient limits."""
    return SmtpSettings(hostname=config.hostname, internal_networks=LOOPBACK,
                        max_message_size=config.max_message_size,
                        max_recipients=config.max_recipients, loopback_only=True)


async def _listen(address: str, setting: str, opening: Awaitable[asyncio.Server]
                  ) -> asyncio.Server:
    """Open a listener, or stop with a message that names the setting to change."""
    try:
        return await opening
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise MailmoatError(f"cannot listen on {address} (gateway.{setting}): {reason}"
                            ) from None


async def open_listeners(config: GatewayConfig, main: GatewayHandler, reinject: GatewayHandler,
                         ready: ReadyCheck | None = None
                         ) -> tuple[asyncio.Server, asyncio.Server, asyncio.Server | None]:
    """serve's listeners on their configured addresses: SMTP on gateway.listen, the
    milters' re-injection on gateway.reinject_listen and the metrics on
    gateway.metrics_listen (none when it is empty). One that cannot open closes the others
    and stops serve with a message naming its setting."""
    opened: list[asyncio.Server] = []
    try:
        opened.append(await _listen(config.listen, "listen",
                                    start_listener(main, *split_hostport(config.listen))))
        opened.append(await _listen(config.reinject_listen, "reinject_listen",
                                    start_listener(reinject,
                                                   *split_hostport(config.reinject_listen))))
        if config.metrics_listen:
            opened.append(await _listen(config.metrics_listen, "metrics_listen",
                                        serve_metrics(*split_hostport(config.metrics_listen),
                                                      ready=ready)))
    except BaseException:
        for server in opened:
            server.close()
        raise
    return opened[0], opened[1], opened[2] if len(opened) > 2 else None


def apply_policy(handler: GatewayHandler, policy: Policy) -> None:
    """The SMTP server's part of a reloaded policy, for the connections that come next."""
    handler.settings = replace(handler.settings, internal_networks=policy.internal_networks)


async def _run(config: GatewayConfig, holder: PolicyHolder[Policy],
               supervisor: MilterSupervisor, queue: Queue, delivery: DeliveryProcess,
               users: UserFile | None, loop_name: str,
               console: ConsoleProcess | None = None) -> None:
    # First: a SIGTERM that comes while the listeners open must stop us cleanly too.
    stop = asyncio.Event()
    hangups: list[int] = []  # SIGHUPs not yet acted on (the main loop reloads)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    wake = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, lambda: (hangups.append(1), wake.set()))
    settings = smtp_settings(config, holder.current, users, server_tls(config))
    members = supervisor.members()
    pool = MilterPool()  # milter connections kept between SMTP sessions
    chain: Callable[[], ChainSession] | None = (
        (lambda: ChainSession(members, pool=pool)) if members else None)
    # Copies and notices the milters hand back pass the re-injection chain (sign) only.
    again = supervisor.members(reinjection=True)
    reinject_chain: Callable[[], ChainSession] | None = (
        (lambda: ChainSession(again, pool=pool)) if again else None)
    if config.metrics_listen:
        METRICS.gauge("mailmoat_queue_messages", lambda: float(len(queue.entries())))
    # /readyz: the queue, every milter of the chain (the re-injection chain is a part of
    # it), the Store.
    readiness = Readiness(queue.tmp_dir, [m.endpoint for m in members],
                          lambda: open_gateway_store(config))
    handler = GatewayHandler(settings, queue, chain, delivery.notify)
    main, reinject, metrics = await open_listeners(
        config, handler,
        GatewayHandler(reinject_smtp_settings(config), queue, reinject_chain, delivery.notify),
        readiness.problems)
    log_event("serve_started", listen=config.listen, reinject=config.reinject_listen,
              metrics=config.metrics_listen or None,
              milters=",".join(m.name for m in config.milters) or "none",
              relay=config.relay_default, loop=loop_name)
    delivery.watch_metrics(loop)
    # Held for review: timers, decisions carried out, released mail through the later milters.
    reviews = review_runner(config, queue, members, pool, delivery.notify) if members else None
    digests = digest_timer(config)  # review.digest: the digest mails, once per period
    while not stop.is_set():
        if hangups:
            hangups.clear()
            if holder.reload("SIGHUP"):
                apply_policy(handler, holder.current)
            supervisor.hangup()  # each milter reloads (or keeps) its own policy
            if console is not None:
                console.hangup()
        elif holder.reload_if_changed():  # an edit without a SIGHUP, as the milters do
            apply_policy(handler, holder.current)
        supervisor.check()
        if not delivery.alive():
            log_event("delivery_process_died", level=logging.ERROR, action="restarting")
            delivery.restart()
        if console is not None:
            console.check()
        if reviews is not None:
            reviews.poke()
        if digests is not None:
            digests.poke()
        wake.clear()
        stopping = loop.create_task(stop.wait())
        woken = loop.create_task(wake.wait())
        await asyncio.wait((stopping, woken), timeout=1.0,
                           return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        woken.cancel()
    if reviews is not None:
        await reviews.stop()  # before the listeners close: a notice it sends needs them
    if digests is not None:
        await digests.stop()
    for server in (main, reinject, metrics):
        if server is not None:
            server.close()
            await server.wait_closed()
    pool.close_all()
    readiness.close()
    delivery.stop()  # lets the deliveries in flight finish


def serve(config: GatewayConfig, config_path: str | None,
          load_policy: Callable[[Path], Policy]) -> int:
    # A broken policy stops us here, with its errors; later, a broken edit is only logged.
    holder = PolicyHolder(config.policy, load_policy)
    try:
        loop_name, new_loop = loop_factory()
    except ValueError as exc:
        raise MailmoatError(str(exc)) from None
    # Root: bind the privileged ports, then become gateway.user before the queue, the
    # milters or delivery exist (mta/gateway/privileges.py).
    privileges.become_user(config, [split_hostport(config.listen),
                                    split_hostport(config.reinject_listen)])
    queue = Queue(config.queue.dir)  # marks or upgrades its format; refuses a newer one
    with open_gateway_store(config):  # the same for the state, before any milter uses it
        pass
    for queue_id in queue.recover():
        log_event("recovered_incomplete", queue_id=queue_id, action="removed (never accepted)")
    users = user_file(config)
    supervisor = MilterSupervisor(config, config_path)
    delivery = DeliveryProcess(config_path, preexec=_die_with_parent)
    console: ConsoleProcess | None = None
    try:
        supervisor.start()
        if config.console.configured and config_path:  # `mailmoat console`, supervised
            console = ConsoleProcess(config_path, preexec=_die_with_parent)
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(_run(config, holder, supervisor, queue, delivery, users, loop_name,
                            console))
    finally:
        if console is not None:
            console.stop()
        delivery.stop()
        supervisor.stop()
        log_event("serve_stopped", pid=os.getpid())
    return 0
