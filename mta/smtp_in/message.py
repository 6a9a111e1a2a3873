"""The DATA path of SMTP in: the message streamed into its spool file behind our Received
header, the checks that hold for the whole message, the milters' end-of-message verdict,
and the queue, whose fsyncs come before the final 250 (a spool failure is 452 4.3.1)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from milters.core.eventlog import log_event
from milters.core.verdict import Action, Verdict

from mta.chain.async_driver import begin
from mta.chain.edits_apply import Transit
from mta.chain.message_text import MessageText
from mta.delivery.smtputf8 import REQUESTED as SMTPUTF8_REQUESTED
from mta.metrics import METRICS
from mta.queue.spool import Envelope as QueueEnvelope
from mta.queue.spool import RESUME_AFTER, Incoming, RecipientState, SpoolError
from .data import DataStream
from .session import SmtpConnection, Transaction
from .trace import protocol_name, received_header

if TYPE_CHECKING:
    from mta.chain.session import ChainSession


def reply_for(verdict: Verdict) -> str:
    return str(verdict.reply) if verdict.reply else {
        Action.REJECT: "550 5.7.1 Rejected", Action.TEMPFAIL: "451 4.7.1 Try again later",
    }.get(verdict.action, "250 2.0.0 Ok")


async def receive_message(conn: SmtpConnection, transaction: Transaction) -> bool:
    """DATA, once the command is accepted: False when the client went away."""
    incoming, transaction.spool = transaction.spool, None
    if incoming is None:
        try:
            incoming = conn.gateway.queue.receive(transaction.queue_id)
        except OSError as exc:
            log_event("spool_error", queue_id=transaction.queue_id, ip=conn.client_ip,
                      error=str(exc))
            conn.reply("452 4.3.1 Insufficient system storage")
            return True
    try:
        incoming.write(received_header(
            helo=conn.helo, client_ip=conn.client_ip, hostname=conn.settings.hostname,
            queue_id=transaction.queue_id,
            protocol=protocol_name(conn.esmtp, conn.tls, conn.auth_user is not None),
            recipients=[address for address, _ in transaction.recipients]))
    except OSError as exc:
        incoming.discard()
        log_event("spool_error", queue_id=transaction.queue_id, ip=conn.client_ip,
                  error=str(exc))
        conn.reply("452 4.3.1 Insufficient system storage")
        return True
    conn.reply("354 End data with <CR><LF>.<CR><LF>")
    stream = DataStream(incoming.write, max_size=conn.settings.max_message_size,
                        max_header_bytes=conn.settings.max_header_bytes)
    conn.expect("data")  # the whole DATA has a deadline, not only each read
    try:
        while not stream.feed(conn.buf):
            if not await conn.more():
                incoming.discard()
                return False
    finally:
        conn.expect(None)
    conn.transaction = None
    try:
        answer = await _finish(conn, transaction, incoming, stream)
    except BaseException:
        incoming.discard()
        raise
    if answer is not None:
        conn.reply(answer)
    return True


async def _finish(conn: SmtpConnection, transaction: Transaction, incoming: Incoming,
                  stream: DataStream) -> str | None:
    """What to answer at the end of DATA; None when the message is queued and its 250
    already sent."""
    client = conn.client_ip
    METRICS.count("mailmoat_messages_received_total")
    refusal = None
    if stream.bare_line_end:
        refusal = ("bare LF or CR",
                   "554 5.6.0 Message refused: bare LF or CR in the data; send CRLF line ends")
    elif stream.too_big:
        refusal = ("too big", "552 5.3.4 Message size exceeds fixed maximum message size")
    elif stream.received_headers >= conn.settings.max_hops:
        refusal = ("mail loop", "554 5.4.0 Error: too many hops (mail loop?)")
    elif stream.header_too_big:
        refusal = ("header too big", "552 5.3.4 Message header too large")
    elif stream.sink_error is not None:
        incoming.discard()
        log_event("spool_error", queue_id=transaction.queue_id, ip=client,
                  error=str(stream.sink_error))
        return "452 4.3.1 Insufficient system storage"
    if refusal is not None:
        incoming.discard()
        METRICS.count("mailmoat_messages_rejected_total", by="smtpd")
        log_event("reject", stage="data", queue_id=transaction.queue_id, ip=client,
                  reason=refusal[0])
        return refusal[1]
    if stream.stray_header_line is not None:
        # As Postfix's cleanup: the header ended at this line, an empty line put before it.
        log_event("header_ended_early", queue_id=transaction.queue_id, ip=client,
                  line=stream.stray_header_line.decode("utf-8", "backslashreplace"))
    recipients = [(address, " ".join(params) or None)
                  for address, params in transaction.recipients]
    replacement: MessageText | None = None
    sender, quarantine = transaction.sender, None
    transit: Transit | None = None
    if conn.chain is not None:
        answer, transit, replacement = await _through_chain(conn, conn.chain, transaction,
                                                            incoming, recipients)
        if answer is not None:
            return answer
        assert transit is not None
        sender, recipients, quarantine = transit.sender, transit.recipients, transit.quarantine
    if not recipients:
        incoming.discard()
        if transit is not None:
            transit.remove_scratch()
        return "250 2.0.0 Ok: no recipients left"
    envelope = QueueEnvelope(
        transaction.queue_id, sender,
        [RecipientState(address, params) for address, params in recipients],
        received_at=time.time(), client_ip=client, helo=conn.helo, hold_reason=quarantine)
    if conn.auth_user:
        envelope.extra["auth_user"] = conn.auth_user
    if conn.chain is not None and conn.chain.review_hold_by is not None:
        # Held for review: the milters after this one run on release (mta/review/resume.py).
        envelope.extra[RESUME_AFTER] = conn.chain.review_hold_by
    if any(param.upper() == "SMTPUTF8" for param in transaction.params):
        envelope.extra[SMTPUTF8_REQUESTED] = "yes"  # delivery passes it on (delivery/smtputf8.py)
    # The chain's edited text: small ones as bytes, else its file, taken as it is.
    new_text = None if replacement is None else replacement.data
    adopt = None if replacement is None else replacement.path
    try:
        # The fsyncs: inline when this is the only client (an executor hop costs more than
        # the fsync), in a thread when others are waiting, so their work goes on meanwhile.
        if conn.gateway.open_connections > 1:
            queue_id = await conn.blocking(
                lambda: incoming.commit(envelope, new_text, adopt=adopt))
        else:
            queue_id = incoming.commit(envelope, new_text, adopt=adopt)
    except SpoolError as exc:
        log_event("spool_error", queue_id=transaction.queue_id, ip=client, error=str(exc))
        return "452 4.3.1 Insufficient system storage"
    finally:
        if transit is not None:
            transit.remove_scratch(keep=adopt)  # the adopted file is in active/ by now
    # The client waits for this reply and nothing else: it goes out before the rest.
    conn.reply(f"250 2.0.0 Ok: queued as {queue_id}")
    conn.flush()
    if conn.gateway.on_queued is not None:
        conn.gateway.on_queued(queue_id)
    METRICS.count("mailmoat_messages_queued_total")
    log_event("queued", queue_id=queue_id, ip=client, helo=conn.helo, sender=sender,
              nrcpt=len(recipients), rcpts=",".join(address for address, _ in recipients),
              size=envelope.size, message_id=stream.message_id, held=quarantine)
    return None


async def _through_chain(conn: SmtpConnection, chain: ChainSession, transaction: Transaction,
                         incoming: Incoming, recipients: list[tuple[str, str | None]]
                         ) -> tuple[str | None, Transit | None, MessageText | None]:
    """The message through the milters: (the reply that ends the transaction, None, None)
    or (None, the message as they left it, its new text if they changed it). The milters
    read the spool file a chunk at a time (a small message from the copy kept in memory);
    edits go to new files in tmp/."""
    kept = incoming.kept()
    received = (MessageText.of(kept) if kept is not None
                else MessageText(path=incoming.path, size=incoming.size))
    start = Transit(received, transaction.sender, recipients,
                    workdir=conn.gateway.queue.tmp_dir)
    queue_id, client = transaction.queue_id, conn.client_ip
    try:
        verdict, transit = await begin(chain.g_message(start, {"i": queue_id}))
    except OSError as exc:
        # Reading the message or writing an edited one failed (disk full, I/O error): the
        # milters are told the message is off, the client to try again later.
        start.remove_scratch()
        incoming.discard()
        log_event("spool_error", queue_id=queue_id, ip=client, error=str(exc))
        await begin(chain.g_abort())
        return "452 4.3.1 Insufficient system storage", None, None
    except BaseException:
        start.remove_scratch()
        raise
    if verdict.action is Action.DISCARD:
        incoming.discard()
        transit.remove_scratch()
        log_event("discarded", queue_id=queue_id, ip=client, sender=transaction.sender)
        return "250 2.0.0 Ok: discarded", None, None
    if verdict.ends_transaction and verdict.action is not Action.ACCEPT:
        incoming.discard()
        transit.remove_scratch()
        return reply_for(verdict), None, None
    return None, transit, (None if transit.text is received else transit.text)
