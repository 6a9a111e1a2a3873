"""SMTP in: the mail transaction's commands, MAIL, RCPT and DATA, each asking the milters
at its stage; DATA hands over to mta/smtp_in/message.py, which queues the message before
the 250."""
from __future__ import annotations

from milters.core.eventlog import log_event
from milters.core.policy.matching import match_address

from mta.chain.async_driver import begin
from mta.chain.session import mail_macros, rcpt_macros
from mta.metrics import METRICS
from mta.queue.spool import Incoming, new_queue_id
from .message import receive_message
from .message import reply_for as _reply
from .relay_checks import (SMTPUTF8_NEEDED, domain_problem, is_loopback, recipient_problem,
                           sender_routed)
from .session import SmtpConnection, Transaction, command
from .syntax import PathArgument, SyntaxProblem, parse_path
MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH"})


@command("MAIL")
async def _mail(conn: SmtpConnection, arg: str) -> bool:
    settings = conn.settings
    if conn.helo is None:
        return conn.error("503 5.5.1 Error: send HELO/EHLO first")
    if conn.transaction is not None:
        return conn.error("503 5.5.1 Error: nested MAIL command")
    if settings.loopback_only and not is_loopback(conn.peer_ip):
        return conn.error("554 5.7.1 Re-injection is for local clients only")
    try:
        path = parse_path(arg, "FROM")
    except SyntaxProblem as problem:
        return conn.error(problem.reply)
    problem = _mail_params_problem(conn, path)
    if problem:
        return conn.error(problem)
    if conn.early_verdict is not None:
        conn.reply(_reply(conn.early_verdict))
        return True
    # The queue ID exists from MAIL FROM on, so milters and our logs name the same ID.
    queue_id = new_queue_id()
    chain = await conn.chain_ready()
    if conn.early_verdict is not None:
        conn.reply(_reply(conn.early_verdict))
        return True
    spool = None
    if chain is not None:
        stage = begin(chain.g_mail(path.address, path.raw_params,
                                   mail_macros(queue_id, path.address, conn.auth_user)))
        # While the milters work on MAIL, create the spool file (an inode and a directory
        # entry: the slow part of starting DATA), so that DATA does not wait for it.
        spool = _open_spool(conn, queue_id)
        try:
            verdict = await stage
        except BaseException:  # the session went away meanwhile
            if spool is not None:
                spool.discard()
            raise
        if verdict.ends_transaction:
            if spool is not None:
                spool.discard()
            conn.reply(_reply(verdict))
            return True
    conn.reply("250 2.1.0 Ok")
    if spool is None:
        # No milter to wait for: the reply goes out first, and the file is made while the
        # client answers it with RCPT.
        conn.flush()
        spool = _open_spool(conn, queue_id)
    conn.transaction = Transaction(queue_id, path.address, path.raw_params,
                                   smtputf8="SMTPUTF8" in path.params, spool=spool)
    return True


def _open_spool(conn: SmtpConnection, queue_id: str) -> Incoming | None:
    """The message's spool file, opened ahead of DATA; None if the spool refuses now
    (DATA tries again and answers 452 if it still cannot)."""
    try:
        return conn.gateway.queue.receive(queue_id)
    except OSError:
        return None


def _mail_params_problem(conn: SmtpConnection, path: PathArgument) -> str | None:
    unknown = [name for name in path.params if name not in MAIL_PARAMS]
    if unknown:
        return f"555 5.5.4 Unsupported option: {unknown[0]}"
    size = path.params.get("SIZE")
    if size is not None:
        if not (size.isascii() and size.isdigit()):
            return "501 5.5.4 Bad SIZE parameter"
        if int(size) > conn.settings.max_message_size:
            return "552 5.3.4 Message size exceeds fixed limit"
    body = (path.params.get("BODY") or "7BIT").upper()
    if body not in ("7BIT", "8BITMIME"):
        return "501 5.5.4 Bad BODY parameter"
    if not path.address.isascii() and "SMTPUTF8" not in path.params:
        return SMTPUTF8_NEEDED
    if domain_problem(path.address):
        return "553 5.1.7 Bad sender address syntax (not an IDNA 2008 domain)"
    return None


@command("RCPT")
async def _rcpt(conn: SmtpConnection, arg: str) -> bool:
    gateway, transaction = conn.gateway, conn.transaction
    if transaction is None:
        return conn.error("503 5.5.1 Error: need MAIL command")
    try:
        path = parse_path(arg, "TO")
    except SyntaxProblem as problem:
        return conn.error(problem.reply)
    if path.params:
        return conn.error(f"555 5.5.4 Unsupported option: {next(iter(path.params))}")
    address = path.address
    if not address.isascii() and not transaction.smtputf8:
        return conn.error(SMTPUTF8_NEEDED)  # RFC 6531 3.4: only in an SMTPUTF8 transaction
    if domain_problem(address):
        return conn.error("553 5.1.3 Bad recipient address syntax (not an IDNA 2008 domain)")
    trusted = conn.auth_user is not None or gateway.internal(conn.client_ip)
    if not trusted:
        problem = recipient_problem(address)
        if problem:
            return conn.error(problem)
        # Sender-specified routing from a client that may not relay is a relay attempt
        # through our relay domain's server, and answered as Postfix answers it with
        # allow_untrusted_routing = no: 554 5.7.1 Relay access denied (permanent: no retry
        # will ever change it; 5.7.1, delivery not authorized). Trusted clients may still
        # route, as in Postfix, where the setting concerns untrusted clients only.
        routed = sender_routed(address)
        if routed or not gateway.relay_domain(address):
            METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
            log_event("reject", stage="rcpt", ip=conn.client_ip, rcpt=address,
                      reason="sender-specified routing" if routed else "relay access denied")
            return conn.error(f"554 5.7.1 <{address}>: Relay access denied")
    if (conn.settings.valid_recipients and gateway.relay_domain(address)
            and not match_address(address, conn.settings.valid_recipients).matched):
        METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
        log_event("reject", stage="rcpt", ip=conn.client_ip, rcpt=address,
                  reason="unknown recipient")
        return conn.error(f"550 5.1.1 <{address}>: Recipient address rejected: User unknown")
    if len(transaction.recipients) >= conn.settings.max_recipients:
        conn.reply("452 4.5.3 Too many recipients")
        return True
    if conn.chain is not None:
        verdict = await begin(conn.chain.g_rcpt(
            address, path.raw_params, rcpt_macros(transaction.queue_id, address)))
        if verdict.ends_transaction:
            conn.reply(_reply(verdict))
            return True
    transaction.recipients.append((address, path.raw_params))
    conn.reply("250 2.1.5 Ok")
    return True


@command("DATA")
async def _data(conn: SmtpConnection, arg: str) -> bool:
    transaction = conn.transaction
    if transaction is None:
        return conn.error("503 5.5.1 Error: need MAIL command")
    if not transaction.recipients:
        return conn.error("554 5.5.1 Error: no valid recipients")
    if arg:
        return conn.error("501 5.5.4 Syntax: DATA")
    return await receive_message(conn, transaction)
