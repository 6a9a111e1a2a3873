"""STARTTLS towards a next hop, per route, as Postfix's smtp_tls_security_level:

    none     never STARTTLS
    may      STARTTLS when offered, no certificate check; if the handshake fails, deliver in
             plain text over a new connection (Postfix does the same for opportunistic TLS)
    encrypt  TLS required, no certificate check: no STARTTLS offered, or a failed handshake,
             defers the mail (4.7.4 / 4.7.5) and it is retried on the schedule
    verify   as encrypt, and the certificate must chain to the system CAs (or `ca_file`) and
             name the next hop's host (the host in smtp:[host]:port)

`secure()` runs after the first EHLO and says how the session may go on.
"""
from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

PLAIN, SECURED, RETRY_PLAIN = "plain", "secured", "retry plain"


@dataclass(frozen=True)
class TlsPolicy:
    level: str = "may"
    ca_file: Path | None = None

    @property
    def required(self) -> bool:
        return self.level in ("encrypt", "verify")

    @cached_property
    def context(self) -> ssl.SSLContext:
        """One context per route (loading CAs costs milliseconds; its sessions share it)."""
        if self.level == "verify":
            # The default context checks the chain and the host name.
            return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context


class TlsRefused(Exception):
    """The route requires TLS and this next hop cannot give it: `reply` is the deferral."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def secure(client: smtplib.SMTP, policy: TlsPolicy, where: str) -> tuple[str, str]:
    """STARTTLS as the policy says, after EHLO. Returns (SECURED or PLAIN, "") to go on in
    this session, (RETRY_PLAIN, why) when opportunistic TLS failed midway (the session is
    closed: open a new one without STARTTLS); raises TlsRefused when the policy requires TLS
    and it failed: a 4xx, never a 5xx, since the next hop may be fixed (Postfix defers too)."""
    if policy.level == "none":
        return PLAIN, ""
    if not client.has_extn("starttls"):
        if policy.required:
            raise TlsRefused(f"451 4.7.4 TLS is required, but was not offered by host {where}")
        return PLAIN, ""
    try:
        client.starttls(context=policy.context)
        client.ehlo()
    except smtplib.SMTPResponseException as exc:  # STARTTLS refused: the session is still plain
        if policy.required:
            raise TlsRefused(f"451 4.7.5 host {where} refused STARTTLS: {exc.smtp_code} "
                             f"{_text(exc.smtp_error)}") from None
        return PLAIN, ""
    except ssl.SSLCertVerificationError as exc:
        client.close()
        raise TlsRefused(f"451 4.7.5 Server certificate not verified: host {where}: "
                         f"{exc.verify_message or exc.reason}") from None
    except (OSError, smtplib.SMTPException) as exc:  # handshake or the EHLO after it failed
        client.close()
        why = _text(str(exc)) or type(exc).__name__
        if policy.required:
            raise TlsRefused(f"451 4.7.5 TLS handshake with host {where} failed: {why}") from None
        return RETRY_PLAIN, why
    return SECURED, ""


def _text(message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return " ".join(text.split())
