"""`mailmoat console`: the console's process. It binds its listener itself (a bind error is
a clear message, not uvicorn's exit), checks TLS and the session key before the first
request, and runs the app under uvicorn on uvloop until SIGTERM or SIGINT."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
from typing import Any, Callable, Iterator

import uvicorn

from milters.core.config import GatewayConfig
from milters.core.config_console import console_listen_problem
from milters.core.errors import ConfigError, MailmoatError
from milters.core.eventlog import log_event
from milters.core.secrets import world_readable
from milters.core.store import Store, open_gateway_store

from mta.aio.event_loop import loop_factory
from mta.gateway import privileges
from mta.operations.review import review_operations_for
from mta.operations.wiring import operations_for

from .app import create_app
from . import login
from .context import Authenticator
from .identity import Actor
from .sessions import load_secret_key

SHUTDOWN_GRACE = 5  # s: open keep-alive connections do not hold a SIGTERM up longer


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT end the console cleanly (status 0, console_stopped logged);
        uvicorn's own handler would raise the signal again once it has shut down. SIGHUP
        (systemctl reload, or serve passing its own on) loads the TLS certificate again,
        for a renewed one; without SIGHUP's handler it would end the process."""
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.reload_tls)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


    def reload_tls(self, *_: object) -> None:
        """New handshakes get the certificate now in the files; a pair that does not load
        (a renewal half written, a key the console's user cannot read) keeps the old one."""
        context, cert, key = self.config.ssl, self.config.ssl_certfile, self.config.ssl_keyfile
        if context is None or cert is None:
            log_event("console_reloaded", tls="off")
            return
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            log_event("console_reload_failed", level=logging.ERROR, cert=cert,
                      error=getattr(exc, "strerror", None) or str(exc),
                      action="kept the certificate in use")
            return
        log_event("console_reloaded", tls="on", cert=cert)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def check_tls(config: GatewayConfig) -> None:
    """The certificate and key load, and the key is not readable by every user."""
    settings = config.console
    if settings.tls_cert is None or settings.tls_key is None:
        return
    try:
        problem = world_readable(os.stat(settings.tls_key).st_mode)
        if problem:
            raise ConfigError([f"{config.source}: console.tls.key {settings.tls_key} {problem};"
                               f" run 'chmod o-rwx {settings.tls_key}'"])
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(settings.tls_cert), str(settings.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"{config.source}: console.tls: cannot load {settings.tls_cert} "
                           f"with {settings.tls_key}: {getattr(exc, 'strerror', None) or exc}"]
                          ) from None


def default_authenticator(config: GatewayConfig, store: Callable[[], Store]
                          ) -> Authenticator:
    """Local accounts and LDAP (mta/console/login.py), throttled in the Store."""
    def authenticate(name: str, password: str, source: str) -> Actor:
        return login.authenticate(config.console, store(), name, password, source)
    return authenticate


def bind(listen: str) -> socket.socket:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise MailmoatError(f"cannot listen on {listen} (console.listen): "
                            f"{exc.strerror or exc}") from None


def run_console(config: GatewayConfig, *, operations: Any = None,
                points_half_life: float | None = None) -> int:
    settings = config.console
    if not settings.configured:
        raise MailmoatError(f"{config.source}: no console: block; add one (e.g. `console: "
                            "{listen: 127.0.0.1:8026}`) to run the console")
    problem = console_listen_problem(settings.listen, settings.tls)
    if problem:  # the config loader refuses it too; a replaced config must not slip past
        raise ConfigError([f"{config.source}: console: {problem}"])
    check_tls(config)
    try:
        loop_name, _ = loop_factory()
    except ValueError as exc:
        raise MailmoatError(str(exc)) from None
    # Started as root (alone, not by serve): bind, read the key and the TLS files, then
    # become gateway.user before any request or the Store is touched.
    run_as = privileges.plan(config, "console")
    sock = bind(settings.listen)
    key = load_secret_key(settings.secret_key_file)
    holder: list[Store] = []  # the Store opens after the drop; logins look it up here

    def store() -> Store:
        return holder[0]

    app = create_app(settings, key=key, authenticate=default_authenticator(config, store),
                     operations=operations)
    server = _Server(uvicorn.Config(
        app, loop="uvloop" if loop_name == "uvloop" else "asyncio", log_config=None,
        access_log=False, log_level="warning", server_header=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE, proxy_headers=False,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None))
    server.config.load()  # reads the TLS files now, while they are readable
    if run_as is not None:
        os.chown(settings.secret_key_file, run_as.uid, run_as.gid)
        privileges.prepare([], privileges.state_database(config), run_as)
        privileges.drop(run_as)
    holder.append(open_gateway_store(config))
    console = app.app.state.console  # type: ignore[attr-defined]
    if console.operations is None:  # opened as gateway.user: files it makes are its own
        try:
            console.operations = operations_for(config, holder[0], points_half_life)
        except OSError as exc:
            holder[0].close()
            raise MailmoatError(f"cannot open the queue {config.queue.dir}: "
                                f"{exc.strerror or exc}") from None
    if console.reviews is None:  # the review links' pages (the key file is read on use)
        console.reviews = review_operations_for(config, getattr(console.operations, "audit",
                                                                None))
    try:
        log_event("console_started", listen=settings.listen, tls=settings.tls,
                  loop=loop_name, pid=os.getpid())
        server.run(sockets=[sock])
    finally:
        holder[0].close()
        if console.reviews is not None:
            console.reviews.book.close()
        audit = getattr(console.operations, "audit", None)
        if audit is not None and hasattr(audit, "close"):
            audit.close()
        log_event("console_stopped", pid=os.getpid())
    return 0
