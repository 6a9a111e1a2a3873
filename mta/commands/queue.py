"""`mailmoat queue list|show|flush|delete|hold|release`: through the operations as cli:USER
(an admin), so that the audit log records what an admin does from the shell too."""
from __future__ import annotations

import argparse

from milters.core.config import load_config
from milters.core.eventlog import setup_logging

from mta.operations import cli_actor
from mta.operations.wiring import operations_for
from mta.queue import admin as queue_admin


def add_parser(sub: argparse._SubParsersAction, parser_class: type, config_help: str
               ) -> None:
    queue = sub.add_parser("queue", help="inspect and manage the mail queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True, parser_class=parser_class)
    for name, text, needs_id in (("list", "every queued message", False),
                                 ("show", "one message with its envelope", True),
                                 ("flush", "retry every deferred message now", False),
                                 ("delete", "remove a message for good", True),
                                 ("hold", "keep a message from delivery", True),
                                 ("release", "let a held message go", True)):
        command = qsub.add_parser(name, help=text)
        if needs_id:
            command.add_argument("id", metavar="ID")
        if name == "release":
            command.add_argument("--rcpt", nargs="+", metavar="ADDR",
                                 help="release to these recipients only; the rest stay held")
        command.add_argument("--config", metavar="FILE", help=config_help)
        command.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config.log.to == "syslog":  # the admin's actions reach the mail log, as postsuper's
        setup_logging("queue", settings=config.log)
    ops, actor = operations_for(config), cli_actor()
    action = args.queue_command
    if action == "list":
        print("\n".join(queue_admin.list_lines(ops.entries(actor))))
    elif action == "show":
        print(queue_admin.show_text(ops.queue.envelope(args.id), ops.original(actor, args.id)))
    elif action == "flush":
        print(f"{ops.flush(actor)} message(s) made due now")
    elif action == "delete":
        ops.delete(actor, args.id)
        print(f"{args.id}: deleted")
    elif action == "hold":
        ops.hold(actor, args.id)
        print(f"{args.id}: on hold")
    elif action == "release":
        print(f"{args.id}: {ops.release(actor, args.id, args.rcpt).detail}")
    return 0


