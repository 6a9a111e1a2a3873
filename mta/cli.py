"""The `mailmoat` command line (DESIGN.md section 4). The only module that names milters.

Exit status: 0 success; 1 a policy is invalid, a policy test failed or an operation failed;
2 the command line itself is wrong.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pwd
import signal
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from milters.core.config import GatewayConfig, load_config
from milters.core.errors import ConfigError, MailmoatError
from milters.core.audit.tee import install_tee
from milters.core.eventlog import setup_logging
from milters.core.message import Envelope, Recipient
from milters.core.policy.document import Policy, PolicyExtension, TestMessage, load_policy
from milters.core.policy.schema import parse_size
from milters.attachments.extension import EXTENSION as ATTACHMENTS
from milters.auth.extension import EXTENSION as AUTH
from milters.core.store import open_gateway_store
from milters.ratelimit import admin as ratelimit_admin
from milters.neutralize.extension import EXTENSION as NEUTRALIZE
from milters.ratelimit.extension import EXTENSION as RATELIMIT
from milters.review.extension import EXTENSION as REVIEW
from milters.sign.extension import EXTENSION as SIGN

from mta import __version__
from mta.commands import audit as audit_commands, digest as digest_commands, dkim, init, scan
from mta.commands import postfix_review, queue as queue_command, users as user_command
from mta.commands.usage import (CommandParser, UsageError, ip_address, print_problems,
                                store_url, utc_date)
from mta.commands.scan import ScanRequest, to_crlf
from mta.delivery.process import run_delivery
from mta.gateway import privileges, serve

EXTENSIONS: list[PolicyExtension] = [RATELIMIT, AUTH, NEUTRALIZE, REVIEW, ATTACHMENTS, SIGN]
# Each milter's daemon module, imported only by the process that runs it: a milter process
# then carries its own libraries only (dkimpy and dnspython, libarchive, requests...).
MILTERS: dict[str, str] = {
    "ratelimit": "milters.ratelimit.milter",
    "auth": "milters.auth.milter",
    "neutralize": "milters.neutralize.milter",
    "review": "milters.review.milter",
    "attachments": "milters.attachments.milter",
    "sign": "milters.sign.milter",
}
# Built-in milters that also run on re-injected mail (copies, notices): signing must see
# all that leaves; the others judged the original, and a second pass could treat it twice.
REINJECTION_MILTERS = ("sign",)


def milter_serve(name: str) -> Callable[[GatewayConfig, str, Callable[[Path], Policy]], None]:
    return importlib.import_module(MILTERS[name]).serve  # type: ignore[no-any-return]


def read_policy(path: Path) -> Policy:
    return load_policy(path, EXTENSIONS)


# -- commands ---------------------------------------------------------------------------------
def _run_as(config: GatewayConfig, user: str | None) -> GatewayConfig:
    """--user overrides gateway.user (so the embedded defaults can name one)."""
    if user is None:
        return config
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--user: no such user {user!r}") from None
    return replace(config, user=user)


def cmd_milter(args: argparse.Namespace) -> int:
    setup_logging(args.name, verbose=args.verbose)
    from milters.core.adapter import parse_socket_spec  # pymilter: milter processes only

    try:  # a command line that cannot work is a usage error, whoever runs it
        parse_socket_spec(args.listen)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config = _run_as(load_config(args.config), args.user)
    setup_logging(args.name, verbose=args.verbose, settings=config.log)
    if args.store:  # scan's throwaway state
        config = scan.with_store(config, args.store)
    else:
        install_tee(config, args.name)
    if args.reinject:
        config = replace(config, reinject_listen=args.reinject)
    read_policy(config.policy)  # a broken policy is reported before anything else
    try:
        privileges.become_milter_user(config, args.name, args.listen)
        milter_serve(args.name)(config, args.listen, read_policy)
    except ValueError as exc:  # a bad --listen socket
        raise UsageError(str(exc)) from None
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    failed = False
    for name in args.files:
        try:
            policy = read_policy(Path(name))
        except ConfigError as exc:
            print_problems(exc)
            failed = True
            continue
        print(f"{name}: ok ({len(policy.rules)} rules, {len(policy.tests)} tests)")
    return 1 if failed else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    passed = failed = 0
    for name in args.files:
        try:
            policy = read_policy(Path(name))
        except ConfigError as exc:
            print_problems(exc)
            failed += 1
            continue
        by_name = {ext.name: ext for ext in EXTENSIONS}
        for test in policy.tests:
            problems = [problem for milter, expected in test.expect.items()
                        for problem in by_name[milter].run_test(policy, test, expected)]
            if problems:
                failed += 1
                print(f"FAIL {name}:{test.line}: {test.name}")
                for problem in problems:
                    print(f"     {problem}")
            else:
                passed += 1
                print(f"ok   {name}:{test.line}: {test.name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    policy_path = Path(args.policy) if args.policy else load_config(args.config).policy
    policy = read_policy(policy_path)
    env = Envelope(client_ip=args.client_ip, helo=args.helo, mail_from=args.mail_from,
                   recipients=[Recipient(r) for r in args.rcpt], auth_user=args.auth_user)
    print(f"policy: {policy_path}")
    print(f"message: client {args.client_ip}, sender <{args.mail_from}>, recipients "
          f"{', '.join('<' + r + '>' for r in args.rcpt)}"
          + (f", subject {args.subject!r}" if args.subject else "")
          + (f", authenticated as {args.auth_user}" if args.auth_user else "")
          + (", auth " + ", ".join(f"{m}={r}" for m, r in args.auth.items())
             if args.auth else ""))
    described = TestMessage(client_ip=args.client_ip, mail_from=args.mail_from,
                            rcpt=tuple(args.rcpt), auth_user=args.auth_user,
                            subject=args.subject, auth=args.auth,
                            attachments=tuple(args.attachment), size=args.size)
    for ext in EXTENSIONS:
        if ext.explain_message is not None:
            for line in ext.explain_message(policy, described):
                print(line)
        elif ext.explain is not None:
            for line in ext.explain(policy, env, args.subject, args.auth):
                print(line)
    return 0


def _ratelimit_context(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    config = load_config(args.config)
    policy = read_policy(config.policy)
    return open_gateway_store(config), policy.sections["ratelimit"]


def cmd_ratelimit_show(args: argparse.Namespace) -> int:
    store, settings = _ratelimit_context(args)
    with store:
        for line in ratelimit_admin.show(store, settings, args.ip):
            print(line)
    return 0


def cmd_dmarc_report(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    until = args.until + 86399 if args.until is not None else time.time()
    with open_gateway_store(config) as store:
        from milters.auth import reports as dmarc_reports  # only this command needs it
        rows = dmarc_reports.counted(store, args.domain, args.since, until)
    if not rows:
        print(f"no DMARC results recorded for {args.domain} since "
              f"{datetime.fromtimestamp(args.since, timezone.utc):%Y-%m-%d} (is "
              f"auth.reports.record on in the policy?)", file=sys.stderr)
        return 1
    report_id = f"{config.hostname}-{args.domain}-{int(args.since)}-{int(until)}"
    sys.stdout.buffer.write(dmarc_reports.aggregate_xml(
        args.domain.lower(), rows, org_name=args.org_name or config.hostname,
        email=args.email or f"postmaster@{config.hostname}", since=args.since, until=until,
        report_id=report_id))
    return 0


def cmd_ratelimit_reset(args: argparse.Namespace) -> int:
    store, _ = _ratelimit_context(args)
    with store:
        removed = ratelimit_admin.reset(store, args.ip)
    print(f"{args.ip}: removed {removed} record(s); it starts afresh")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging("serve", verbose=args.verbose)
    config = _run_as(load_config(args.config), args.user)
    setup_logging("serve", verbose=args.verbose, settings=config.log)
    install_tee(config, "serve")
    unknown = [m.name for m in config.milters if m.socket is None and m.name not in MILTERS]
    if unknown:
        raise UsageError(f"{config.source}: milters: unknown built-in milter(s) "
                         f"{', '.join(unknown)}; built in: {', '.join(sorted(MILTERS))} "
                         "(give `socket:` for an external milter)")
    return serve.serve(with_reinjection(config), args.config, read_policy)


def with_reinjection(config: GatewayConfig) -> GatewayConfig:
    """Each milter's `reinjection` decided: sign by default; an external milter (e.g. an
    OpenDKIM signer) when asked; any other built-in one refused."""
    refused = [m.name for m in config.milters
               if m.reinjection and m.socket is None and m.name not in REINJECTION_MILTERS]
    if refused:
        raise UsageError(f"{config.source}: milters: reinjection: true for {', '.join(refused)}"
                         f": only {', '.join(REINJECTION_MILTERS)} (or an external milter) "
                         "runs on re-injected copies and notices; delete the key")
    return replace(config, milters=tuple(
        replace(m, reinjection=m.name in REINJECTION_MILTERS and m.socket is None
                            if m.reinjection is None else m.reinjection)
        for m in config.milters))


def cmd_console(args: argparse.Namespace) -> int:
    setup_logging("console", verbose=args.verbose)
    config = load_config(args.config)
    setup_logging("console", verbose=args.verbose, settings=config.log)
    install_tee(config, "console")  # logins, logouts and refusals, with who and from where
    from mta.console.server import run_console  # Starlette and uvicorn: this process only
    ratelimit = read_policy(config.policy).sections.get("ratelimit")
    return run_console(config, points_half_life=getattr(ratelimit, "half_life", None))


def cmd_deliver(args: argparse.Namespace) -> int:
    setup_logging("delivery", verbose=args.verbose)
    config = load_config(args.config)
    setup_logging("delivery", verbose=args.verbose, settings=config.log)
    install_tee(config, "delivery", purge=True)
    run_delivery(config)
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    setup_logging("scan", verbose=args.verbose)
    try:
        raw = Path(args.message).read_bytes()
    except OSError as exc:
        raise UsageError(f"{args.message}: {exc.strerror or exc}") from None
    request = ScanRequest(to_crlf(raw), client_ip=args.client_ip, helo=args.helo,
                          mail_from=args.mail_from, rcpts=args.rcpt or [],
                          auth_user=args.auth_user)
    config = _run_as(load_config(args.config), args.user)
    if not args.live_state:  # the running gateway's rate limits and reports stay untouched
        config = scan.with_store(config, scan.THROWAWAY_STORE)
    else:
        install_tee(config, "scan")
    privileges.plan(config, "scan (the milters it starts)")  # refuses root without a user
    reinjected_dir = _output_dir(args.reinjected_dir) if args.reinjected_dir else None
    report, transit = scan.scan(config, args.config, request, read_policy, reinjected_dir,
                                live_state=args.live_state)
    scan.print_report(report, args.json)
    if args.out:
        Path(args.out).write_bytes(transit.raw)
    return 0 if report["verdict"] == "accept" else 1


def _output_dir(name: str) -> Path:
    """A directory for scan's files, made if missing (0700: notices hold passwords);
    checked before any milter starts."""
    path = Path(name)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--reinjected-dir {name}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--reinjected-dir {name}: not writable")
    return path


def cmd_init(args: argparse.Namespace) -> int:
    for line in init.init(Path(args.dir), args.profile):
        print(line)
    return 0


# -- parser ---------------------------------------------------------------------------------
def _auth_results(text: str) -> dict[str, str]:
    """"dmarc=fail,spf=pass" -> {"dmarc": "fail", "spf": "pass"}, checked against the names
    policies use."""
    from milters.core.policy.document import AUTH_METHODS, AUTH_RESULTS
    found = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        method, _, result = item.partition("=")
        method, result = method.strip().lower(), result.strip().lower()
        if method not in AUTH_METHODS or result not in AUTH_RESULTS:
            raise argparse.ArgumentTypeError(
                f"'{item}' is not METHOD=RESULT (methods: {', '.join(AUTH_METHODS)}; results: "
                f"{', '.join(AUTH_RESULTS)})")
        found[method] = result
    return found


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="mailmoat", description="mailmoat mail-security gateway")
    parser.add_argument("--version", action="version", version=f"mailmoat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    config_help = "gateway config YAML (default: embedded defaults)"
    user_help = ("started as root: the user to become once the sockets are open (overrides "
                 "gateway.user; `root` keeps root, not recommended)")

    init_parser = sub.add_parser("init", help="write a starting gateway.yaml and policy.yaml",
                                 description="Write DIR/gateway.yaml and DIR/policy.yaml for one "
                                             "kind of deployment, valid as written, and print "
                                             "the next steps. Existing files are never "
                                             "overwritten.")
    init_parser.add_argument("dir", metavar="DIR")
    init_parser.add_argument("--profile", choices=list(init.PROFILES),
                             default=init.DEFAULT_PROFILE,
                             help=f"the deployment (default: {init.DEFAULT_PROFILE})")
    init_parser.set_defaults(func=cmd_init)

    serve_cmd = sub.add_parser("serve", help="run the whole gateway (SMTP, milters, queue)",
                               description="Run the gateway; with no --config on the embedded "
                                           "defaults (SMTP on 127.0.0.1:2525, Maildir ./var/"
                                           "maildir)")
    serve_cmd.add_argument("--config", metavar="FILE", help=config_help)
    serve_cmd.add_argument("--user", metavar="USER", help=user_help)
    serve_cmd.add_argument("--verbose", action="store_true", help="also log debug details")
    serve_cmd.set_defaults(func=cmd_serve)

    deliver_cmd = sub.add_parser(
        "deliver", help="the delivery process (serve starts it; queue IDs on stdin)",
        description="Deliver queued mail: IDs read from stdin are delivered at once, due "
                    "retries every second; metric counts go to stdout as JSON lines. "
                    "`serve` runs this itself.")
    deliver_cmd.add_argument("--config", metavar="FILE", help=config_help)
    deliver_cmd.add_argument("--verbose", action="store_true", help="also log debug details")
    deliver_cmd.set_defaults(func=cmd_deliver)

    console_cmd = sub.add_parser(
        "console", help="the web console and its JSON API (serve starts it when configured)",
        description="Serve the web console on console.listen (default 127.0.0.1:8026); "
                    "off loopback only with console.tls.")
    console_cmd.add_argument("--config", metavar="FILE", help=config_help)
    console_cmd.add_argument("--verbose", action="store_true", help="also log debug details")
    console_cmd.set_defaults(func=cmd_console)

    scan_cmd = sub.add_parser("scan", help="run one message through the milter chain offline")
    scan_cmd.add_argument("message", metavar="MESSAGE.eml")
    scan_cmd.add_argument("--client-ip", default="127.0.0.1", type=ip_address, metavar="IP")
    scan_cmd.add_argument("--helo", default="localhost", metavar="NAME")
    scan_cmd.add_argument("--mail-from", metavar="ADDR", help="default: the From address")
    scan_cmd.add_argument("--rcpt", action="append", metavar="ADDR",
                          help="repeat for more; default: the To and Cc addresses")
    scan_cmd.add_argument("--auth-user", metavar="USER")
    scan_cmd.add_argument("--config", metavar="FILE", help=config_help)
    scan_cmd.add_argument("--out", metavar="OUT.eml", help="write the resulting message")
    scan_cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    scan_cmd.add_argument("--reinjected-dir", metavar="DIR",
                          help="write what milters hand back (copies, password notices) "
                               "as NN-for-RECIPIENT.eml files in DIR")
    scan_cmd.add_argument("--user", metavar="USER", help=f"the milters' user, {user_help}")
    scan_cmd.add_argument("--live-state", action="store_true",
                          help="count against the configured store (a running gateway's "
                               "rate limits); default: a throwaway state, gone after the scan")
    scan_cmd.add_argument("--verbose", action="store_true", help="also log debug details")
    scan_cmd.set_defaults(func=cmd_scan)

    milter = sub.add_parser("milter", help="run one milter for Postfix or Sendmail",
                            description="Run one milter daemon. Postfix: smtpd_milters = "
                                        "inet:127.0.0.1:PORT")
    milter.add_argument("name", choices=sorted(MILTERS))
    milter.add_argument("--listen", required=True, metavar="SOCKET",
                        help="inet:127.0.0.1:PORT, inet6:[::1]:PORT or unix:/path")
    milter.add_argument("--config", metavar="FILE", help=config_help)
    milter.add_argument("--reinject", metavar="HOST:PORT",
                        help="where copies and notices go (default: the config's "
                             "gateway.reinject_listen)")
    milter.add_argument("--user", metavar="USER", help=user_help)
    milter.add_argument("--store", metavar="URL", type=store_url,
                        help="the state store instead of the config's (scan passes memory://)")
    milter.add_argument("--verbose", action="store_true", help="also log debug details")
    milter.set_defaults(func=cmd_milter)

    policy = sub.add_parser("policy", help="check, explain and test policy files")
    psub = policy.add_subparsers(dest="policy_command", required=True, parser_class=CommandParser)
    check = psub.add_parser("check", help="validate policy files; print every problem")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(func=cmd_policy_check)
    test = psub.add_parser("test", help="run the tests: written inside policy files")
    test.add_argument("files", nargs="+", metavar="FILE")
    test.set_defaults(func=cmd_policy_test)
    explain = psub.add_parser("explain", help="show which rule applies to a message and why")
    explain.add_argument("--mail-from", required=True, metavar="ADDR")
    explain.add_argument("--rcpt", required=True, action="append", metavar="ADDR")
    explain.add_argument("--client-ip", default="192.0.2.1", type=ip_address, metavar="IP")
    explain.add_argument("--helo", default="client.example")
    explain.add_argument("--subject", default="")
    explain.add_argument("--auth", type=_auth_results, metavar="METHOD=RESULT,...",
                         help="what the auth milter found, e.g. dmarc=fail,spf=softfail")
    explain.add_argument("--auth-user", metavar="USER")
    explain.add_argument("--attachment", action="append", default=[], metavar="NAME",
                         help="an attachment's file name (repeat for more)")
    explain.add_argument("--size", type=_size, default=10240, metavar="SIZE",
                         help="the message's size, e.g. 12MB (default 10KB)")
    source = explain.add_mutually_exclusive_group()
    source.add_argument("--policy", metavar="FILE", help="policy file (default: the config's)")
    source.add_argument("--config", metavar="FILE", help=config_help)
    explain.set_defaults(func=cmd_policy_explain)

    ratelimit = sub.add_parser("ratelimit", help="inspect and unblock rate-limit state")
    rsub = ratelimit.add_subparsers(dest="ratelimit_command", required=True, parser_class=CommandParser)
    show = rsub.add_parser("show", help="points and bucket use, for one IP or all")
    show.add_argument("ip", nargs="?", type=ip_address)
    show.add_argument("--config", metavar="FILE", help=config_help)
    show.set_defaults(func=cmd_ratelimit_show)
    reset = rsub.add_parser("reset", help="forget an IP's points and buckets")
    reset.add_argument("ip", type=ip_address)
    reset.add_argument("--config", metavar="FILE", help=config_help)
    reset.set_defaults(func=cmd_ratelimit_reset)
    dmarc = sub.add_parser("dmarc", help="DMARC aggregate reports from recorded results")
    dsub = dmarc.add_subparsers(dest="dmarc_command", required=True, parser_class=CommandParser)
    report = dsub.add_parser("report", help="RFC 7489 aggregate report XML for one domain")
    report.add_argument("--domain", required=True)
    report.add_argument("--since", required=True, type=utc_date, metavar="YYYY-MM-DD")
    report.add_argument("--until", type=utc_date, metavar="YYYY-MM-DD",
                        help="last day included (default: now)")
    report.add_argument("--org-name", help="reporting organisation (default: the hostname)")
    report.add_argument("--email", help="report contact (default: postmaster@hostname)")
    report.add_argument("--config", metavar="FILE", help=config_help)
    report.set_defaults(func=cmd_dmarc_report)
    queue_command.add_parser(sub, CommandParser, config_help)
    dkim.add_parser(sub, CommandParser, config_help)
    audit_commands.add_parser(sub, CommandParser, config_help)
    digest_commands.add_parser(sub, CommandParser, config_help)
    user_command.add_parser(sub, CommandParser, config_help)
    postfix_review.add_parser(sub, CommandParser, config_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # here, not at exit (--help too): a closed pipe is caught below
    except BrokenPipeError:
        # `mailmoat ... | head`: the reader left. Quiet, with the status of a tool killed by
        # SIGPIPE; stdout to /dev/null so the interpreter's last flush has nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"mailmoat: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print_problems(exc)
        return 1
    except MailmoatError as exc:
        print(f"mailmoat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
