"""`mailmoat postfix-review`: the review runner for the milters behind Postfix. The review
milter holds a message in Postfix's hold queue; this process sends or cancels it when its
review is decided or its deadline passes (mta/review/postfix_runner.py). Run it as root, one
per Postfix instance: postsuper is reserved to root.

    # mailmoat postfix-review --config /etc/mailmoat/milters.yaml
    postfix-review: watching Postfix (/etc/postfix) and the review book; Ctrl-C stops
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal

from milters.core.audit.tee import install_tee
from milters.core.config import load_config
from milters.core.errors import MailmoatError
from milters.core.eventlog import log_event, setup_logging

ROUND = 1.0  # seconds between rounds: a deadline fires within about this


def cmd_postfix_review(args: argparse.Namespace) -> int:
    from mta.review.digest_timer import digest_timer  # noqa: PLC0415 -- this command only
    from mta.review.postfix_queue import PostfixQueue  # noqa: PLC0415
    from mta.review.postfix_runner import postfix_review_runner  # noqa: PLC0415

    setup_logging("postfix-review", verbose=args.verbose)
    config = load_config(args.config)
    setup_logging("postfix-review", verbose=args.verbose, settings=config.log)
    if config.store == "memory://":
        raise MailmoatError(f"{config.source}: store: memory:// keeps the review book inside "
                            "the review milter's process; behind Postfix the milter and this "
                            "runner share it: use a sqlite:/// or redis:// store")
    if os.geteuid() != 0:
        raise MailmoatError("postfix-review runs postsuper, which Postfix reserves to root: "
                            "run it as root")
    install_tee(config, "postfix-review")  # its decisions and releases join the audit log
    postfix = PostfixQueue(args.postfix_config)
    postfix.listing()  # Postfix not there or not running: said now, not every second
    runner = postfix_review_runner(config, postfix)
    # review.digest: sent from here, as serve does (its state beside the review links' key).
    digests = digest_timer(config, state_dir=config.review.token_key_file.parent)
    where = args.postfix_config or "/etc/postfix"
    print(f"postfix-review: watching Postfix ({where}) and the review book; Ctrl-C stops",
          flush=True)
    log_event("postfix_review_started", postfix=where)
    asyncio.run(_loop([runner] if digests is None else [runner, digests], once=args.once))
    return 0


async def _loop(timers: list, *, once: bool) -> None:  # type: ignore[type-arg]
    """Each timer (the review runner, the digests) poked once a round until a signal."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    while not stopping.is_set():
        for timer in timers:
            timer.poke()
        if once:
            break
        try:
            await asyncio.wait_for(stopping.wait(), ROUND)
        except asyncio.TimeoutError:
            pass
    for timer in timers:
        await timer.stop()
    log_event("postfix_review_stopped")


def add_parser(sub, parser_class, config_help: str) -> None:  # type: ignore[no-untyped-def]
    command = sub.add_parser(
        "postfix-review", help="behind Postfix: send or cancel mail held for review when its "
                               "review is decided (run as root)")
    command.add_argument("--config", metavar="FILE", help=config_help)
    command.add_argument("--postfix-config", metavar="DIR",
                         help="the Postfix instance's config directory (default: Postfix's "
                              "own, /etc/postfix)")
    command.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    command.add_argument("--once", action="store_true",
                         help="one round (timers, then what is decided), then exit")
    command.set_defaults(func=cmd_postfix_review)
