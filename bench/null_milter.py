"""A do-nothing pymilter: the baseline bench/ratelimit.py compares the ratelimit milter with.

    .venv/bin/python bench/null_milter.py --listen unix:/tmp/dir/null.sock [--steps all]

--steps all        every callback is negotiated and answers CONTINUE (headers and body too):
                   what a naive milter costs.
--steps ratelimit  negotiates exactly the protocol steps, no-reply flags and macros the
                   ratelimit milter asks for, so that the only difference left is the
                   ratelimit logic and its store.

Runs until SIGTERM/SIGINT. Like mailmoat, libmilter runs in a worker thread so that the main
thread keeps Python's signal handling.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import Milter  # noqa: E402

from milters.core.adapter import parse_socket_spec, wanted_actions, wanted_protocol  # noqa: E402
from milters.core.milter_protocol import ProtocolFlag  # noqa: E402
from milters.ratelimit.milter import RatelimitLogic  # noqa: E402


class NullMilter(Milter.Base):
    """Every callback answers CONTINUE; pymilter negotiates all of them."""

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return Milter.CONTINUE

    def hello(self, heloname: str) -> int:
        return Milter.CONTINUE

    def envfrom(self, mail_from: str, *params: str) -> int:
        return Milter.CONTINUE

    def envrcpt(self, rcpt: str, *params: str) -> int:
        return Milter.CONTINUE

    def header(self, name: str, value: str) -> int:
        return Milter.CONTINUE

    def eoh(self) -> int:
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        return Milter.CONTINUE

    def eom(self) -> int:
        return Milter.CONTINUE


class NullLikeRatelimit(NullMilter):
    """Same negotiation as mailmoat's ratelimit milter (steps, no-reply flags, macros)."""

    def negotiate(self, opts: list[int]) -> int:
        actions = int(wanted_actions(RatelimitLogic)) & opts[0]
        self._protocol = int(wanted_protocol(RatelimitLogic)) & opts[1]
        opts[0], opts[1], opts[2], opts[3] = actions, self._protocol, 0, 0
        if actions & int(Milter.SETSYMLIST):
            for stage, names in RatelimitLogic.macros.items():
                # str, not bytes: pymilter 1.0.5's own setsymlist passes bytes and fails.
                self._ctx.setsymlist(int(stage), " ".join(names))
        return Milter.CONTINUE

    def _reply(self, no_reply: ProtocolFlag) -> int:
        return Milter.NOREPLY if self._protocol & no_reply else Milter.CONTINUE

    # The ratelimit milter also fetches its macros at MAIL and RCPT; do the same work.
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return self._reply(ProtocolFlag.NR_CONN)

    def hello(self, heloname: str) -> int:
        return self._reply(ProtocolFlag.NR_HELO)

    def envfrom(self, mail_from: str, *params: str) -> int:
        self.getsymval("{auth_authen}")
        self.getsymval("i")
        return self._reply(ProtocolFlag.NR_MAIL)

    def envrcpt(self, rcpt: str, *params: str) -> int:
        self.getsymval("{rcpt_mailer}")
        self.getsymval("i")
        return self._reply(ProtocolFlag.NR_RCPT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="unix:/path or inet:127.0.0.1:PORT")
    parser.add_argument("--steps", choices=("all", "ratelimit"), default="all")
    args = parser.parse_args()

    Milter.factory = NullMilter if args.steps == "all" else NullLikeRatelimit
    if args.listen.startswith("unix:"):
        os.umask(0o111)  # smtpd connects as user postfix: the socket must be writable by it
    stop = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            Milter.runmilter("bench-null", parse_socket_spec(args.listen), 600)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=serve, name="libmilter", daemon=True).start()
    print(f"null milter ({args.steps}) listening on {args.listen}", flush=True)
    while not stop.wait(1.0):
        pass
    # smfi_stop() blocks until libmilter's listener wakes from its poll; do not wait for it,
    # the daemon thread dies with the process.
    threading.Thread(target=Milter.milter.stop, daemon=True).start()
    if failure:
        print(f"null milter failed: {failure[0]!r}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
