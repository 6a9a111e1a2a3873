"""`mailmoat audit verify | show ID | search | purge`: the audit log from the command line.

    $ mailmoat audit verify --config gateway.yaml
    audit: 1234 records, chain intact
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from milters.core.audit import AuditLog, AuditRecord, open_audit_log
from milters.core.audit.tee import purge_expired
from milters.core.config import load_config
from milters.core.errors import MailmoatError
from milters.core.eventlog import format_value

LIMIT = 200  # records search prints unless --limit says otherwise


def _open(args: argparse.Namespace) -> AuditLog:
    config = load_config(args.config)
    if config.store == "memory://":
        raise MailmoatError(f"{config.source}: store: memory:// keeps no audit log between "
                            "processes; nothing to read")
    return open_audit_log(config, create=False)


def cmd_verify(args: argparse.Namespace) -> int:
    with _open(args) as log:
        result = log.verify()
    if result.ok:
        print(f"audit: {result.checked} records, chain intact")
        if args.verbose:
            print(f"audit: tip: record {result.tip_seq} hash {result.tip_hash}")
        return 0
    print(f"audit: record {result.first_bad_seq}: {result.reason}")
    return 1


def cmd_show(args: argparse.Namespace) -> int:
    """A queue ID's story, or a Message-ID's (with or without its <>)."""
    with _open(args) as log:
        records = log.story(args.id)
        if not records:  # a Message-ID: the stories of the queue IDs it was queued as
            message_id = args.id if args.id.startswith("<") else f"<{args.id}>"
            queue_ids = {r.queue_id for r in log.search(message_id=message_id, limit=100)}
            records = sorted((r for q in queue_ids if q for r in log.story(q)),
                             key=lambda r: (r.time, r.seq))
    if not records:
        print(f"audit: no records for {args.id}")
        return 1
    _print(records)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    with _open(args) as log:
        records = log.search(text=args.text, address=args.address, since=args.since,
                             until=args.until, events=args.event or None, limit=args.limit)
    _print(records[::-1])
    if len(records) >= args.limit:
        print(f"audit: the newest {args.limit} shown; narrow the search or raise --limit")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config.audit.retention <= 0:
        print("audit: retention is 0 (keep forever); nothing purged")
        return 0
    with open_audit_log(config, create=False) as log:
        removed = purge_expired(log, config.audit.retention)
    print(f"audit: {removed} records older than the retention purged")
    return 0


def line(record: AuditRecord) -> str:
    """One record as one line: when, seq, event, who, then its fields as key=value."""
    when = datetime.fromtimestamp(record.time, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = [when, f"#{record.seq}", format_value(record.event)]
    for key in ("queue_id", "message_id", "actor", "source"):
        value = getattr(record, key)
        if value is not None:
            head.append(f"{key}={format_value(value)}")
    head += [f"{key}={format_value(value)}" for key, value in sorted(record.fields.items())]
    # format_value quotes and escapes CR/LF; other control characters are shown escaped too
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in " ".join(head))


def _print(records: Iterable[AuditRecord]) -> None:
    for record in records:
        print(line(record))


def _date(end: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        for form in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
            try:
                when = datetime.strptime(text, form).replace(tzinfo=timezone.utc).timestamp()
            except ValueError:
                continue
            return when + 86400 if end and form == "%Y-%m-%d" else when  # --until a day: all of it
        raise argparse.ArgumentTypeError(f"'{text}' is not a date like 2026-11-28 or "
                                         "2026-11-28T09:30:00 (UTC)")
    return parse


def add_parser(sub: argparse._SubParsersAction, parser_class: type, config_help: str) -> None:
    audit = sub.add_parser("audit", help="the audit log: verify its chain, show a story, search")
    asub = audit.add_subparsers(dest="audit_command", required=True, parser_class=parser_class)
    verify = asub.add_parser("verify", help="check that the hash chain is unbroken")
    verify.add_argument("-v", "--verbose", action="store_true",
                        help="also print the tip's seq and hash (note them elsewhere)")
    verify.set_defaults(func=cmd_verify)
    show = asub.add_parser("show", help="one message's story, by queue ID or Message-ID")
    show.add_argument("id", metavar="ID")
    show.set_defaults(func=cmd_show)
    search = asub.add_parser("search", help="records by address, date, event or text")
    search.add_argument("--address", metavar="A", help="a sender or recipient address")
    search.add_argument("--since", type=_date(False), metavar="DATE", help="UTC, from")
    search.add_argument("--until", type=_date(True), metavar="DATE", help="UTC, up to")
    search.add_argument("--event", action="append", metavar="E", help="repeatable")
    search.add_argument("--text", metavar="T", help="any text in the record")
    search.add_argument("--limit", type=int, default=LIMIT, metavar="N")
    search.set_defaults(func=cmd_search)
    purge = asub.add_parser("purge", help="remove records older than audit.retention now")
    purge.set_defaults(func=cmd_purge)
    for command in (verify, show, search, purge):
        command.add_argument("--config", metavar="FILE", help=config_help)
