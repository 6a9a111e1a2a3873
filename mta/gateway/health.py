"""What `/healthz` and `/readyz` on the metrics listener answer (as rspamd's controller and
Kubernetes probes expect): healthz says the process runs and its event loop answers;
readyz says whether mail sent now would be taken: the queue directory takes a file, each
milter of the chain answers a milter negotiation (OPTNEG) and the Store answers a ping.

A load balancer takes the gateway out on a 503 and reads the reasons in the body, one per
line, like `milter ratelimit: not answering (unix:/run/mailmoat/ratelimit.sock: ...)`.
"""
from __future__ import annotations

import os
import secrets
import threading
from dataclasses import replace
from typing import Callable

from milters.core.errors import MailmoatError
from milters.core.store import Store

from mta.chain.client import MilterClient, MilterEndpoint


def queue_problem(tmp_dir: str) -> str | None:
    """None when a file can be created, written and removed in the queue's tmp/ (what
    every accepted message needs first); else why not."""
    path = os.path.join(tmp_dir, f"readyz.{secrets.token_hex(4)}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"readyz\n")
        finally:
            os.close(fd)
            os.unlink(path)
    except OSError as exc:
        return f"queue: cannot write in {tmp_dir}: {exc.strerror or exc}"
    return None


def milter_problem(endpoint: MilterEndpoint) -> str | None:
    """None when the milter negotiates (OPTNEG) within its connect timeout; it sees a
    session with no SMTP stage in it, as when Postfix's client gives up early."""
    # A probe waits no longer than a connect may: 30 s of command timeout would outlast
    # the load balancer's own probe.
    client = MilterClient(replace(endpoint, command_timeout=endpoint.connect_timeout))
    try:
        client.open()
    except (OSError, MailmoatError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        for said in (f"milter {endpoint.name} at {endpoint.socket}: ",
                     f"milter {endpoint.name}: "):  # the client's errors name it already
            reason = reason.removeprefix(said)
        return f"milter {endpoint.name}: not answering ({endpoint.socket}: {reason})"
    finally:
        client.close()
    return None


class Readiness:
    """The checks of /readyz, run in a worker thread (each may block up to its timeout)."""

    def __init__(self, queue_tmp: str, milters: list[MilterEndpoint],
                 open_store: Callable[[], Store]) -> None:
        self.queue_tmp, self.milters = queue_tmp, milters
        self._open_store = open_store
        self._store: Store | None = None
        self._lock = threading.Lock()

    def _store_problem(self) -> str | None:
        with self._lock:  # one Store for every probe, opened on first use
            try:
                if self._store is None:
                    self._store = self._open_store()
                self._store.ping()
            except MailmoatError as exc:
                return f"store: unreachable ({exc})"
        return None

    def problems(self) -> list[str]:
        found = [queue_problem(self.queue_tmp)]
        found += [milter_problem(endpoint) for endpoint in self.milters]
        found.append(self._store_problem())
        return [problem for problem in found if problem]

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
