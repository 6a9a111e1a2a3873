"""`mailmoat digest send | show`: the digest mails now, from the command line.

    $ mailmoat digest send --config gateway.yaml           # cron / a systemd timer
    digest: sent to boss@example.jp (approvals 1)
    $ mailmoat digest show --for boss@example.jp --config gateway.yaml
    (the mail it would send; nothing is sent)

Without a review.digest block the defaults apply (every list, language auto), so a gateway
whose serve does not send digests (milters behind Postfix) can send them from cron.
"""
from __future__ import annotations

import argparse
import re
import sys
import time

from milters.core.config import load_config

from mta.review.digest_run import build_digests, render, send_digests

_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+\Z")


def _address(text: str) -> str:
    text = text.strip()
    if not _ADDRESS.match(text) or len(text) > 320:
        raise argparse.ArgumentTypeError(f"'{text[:80]}' is not a mail address")
    return text.lower()


def _counts(reviews: int, approvals: int, held: int) -> str:
    parts = [f"{name} {n}" for name, n in (("reviews", reviews), ("approvals", approvals),
                                           ("held", held)) if n]
    return ", ".join(parts)


def cmd_send(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    now = time.time()
    digests = build_digests(config, now=now, only=args.to)
    if not digests:
        print(f"digest: nothing waits on {args.to}" if args.to else "digest: nothing waits "
              "on anyone; no digest sent")
        return 0
    sent, failed = send_digests(config, digests, now)
    for digest in sent:
        print(f"digest: sent to {digest.person} ({_counts(*digest.counts)})")
    for digest in failed:
        print(f"digest: NOT sent to {digest.person} (see the log: digest_failed)",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    now = time.time()
    digests = build_digests(config, now=now, only=args.person)
    if not digests:
        print(f"digest: nothing waits on {args.person}; no digest would be sent")
        return 0
    sys.stdout.write(render(config, digests[0], now).decode("ascii").replace("\r\n", "\n"))
    return 0


def add_parser(sub: argparse._SubParsersAction, parser_class: type, config_help: str) -> None:
    digest = sub.add_parser("digest", help="the digest mails: held, quarantined, approvals")
    dsub = digest.add_subparsers(dest="digest_command", required=True,
                                 parser_class=parser_class)
    send = dsub.add_parser("send", help="send the digests now (prints who got one)")
    send.add_argument("--to", type=_address, metavar="ADDR", help="only this person's")
    send.set_defaults(func=cmd_send)
    show = dsub.add_parser("show", help="print the digest one person would get; send nothing")
    show.add_argument("--for", dest="person", type=_address, metavar="ADDR", required=True)
    show.set_defaults(func=cmd_show)
    for command in (send, show):
        command.add_argument("--config", metavar="FILE", help=config_help)


__all__ = ["add_parser"]
