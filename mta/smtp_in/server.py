"""SMTP in: the gateway's own asyncio SMTP server, the milter chain at each stage, and the
durable queue behind the final 250. This module holds the command table and what all
connections share; the bytes, flow control and deadlines are mta/smtp_in/connection.py's,
the DATA path mta/smtp_in/message.py's.

Our own protocol rather than aiosmtpd's: aiosmtpd introspects its classes for every
connection, builds a parser class for every MAIL and RCPT and keeps DATA as one object per
line, which cost 2-4x our time per message and 4x the message in memory (bench/README.md).
Here DATA streams straight into the spool file in blocks (data.DataStream), and a
command costs one dictionary lookup.

- EHLO: PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, STARTTLS (with a
  certificate), AUTH PLAIN LOGIN (with a users file, over TLS or from loopback), XCLIENT (for
  authorized hosts). Replies to pipelined commands go out together when the input runs dry.
- Relay control: a recipient is accepted from internal networks and authenticated clients,
  or for a relay domain (compared as IDNA 2008 A-labels); sender-specified routing (`%`,
  `!`, a second `@`, source routes, quoted local parts hiding them) is relay access denied
  from everyone else. Non-ASCII addresses need SMTPUTF8 on MAIL (553 5.6.7).
- Only CRLF ends a line: a bare LF in a command ends the session (521, as Postfix's
  smtpd_forbid_bare_newline), one in DATA refuses the message (SMTP smuggling).
- Milter verdicts from connect and HELO are given at MAIL FROM, as Postfix does by default.
- The final 250 comes only after the queue has the message on disk; a spool failure is
  452 4.3.1.
"""
from __future__ import annotations

from . import commands, envelope_commands
from .gateway_handler import GatewayHandler
from .session import SmtpConnection
from .settings import SmtpSettings, server_tls_context, smtpd_limits

__all__ = ["GatewayHandler", "SmtpConnection", "SmtpSettings", "server_tls_context",
           "smtpd_limits"]
# The command modules fill the session's command table as they are imported.
COMMAND_MODULES = (commands, envelope_commands)
