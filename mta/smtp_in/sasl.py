"""SASL PLAIN (RFC 4616) and LOGIN for SMTP AUTH (RFC 4954): decoding and reply texts.

Pure functions, no I/O: the SMTP server drives the exchange and checks the password with
mta.smtp_in.users. A SaslError carries the reply to send, and a reason for the log that never
contains the password.
"""
from __future__ import annotations

import base64
import binascii

from milters.core.errors import MailmoatError

MECHANISMS = ("PLAIN", "LOGIN")  # for the EHLO "AUTH PLAIN LOGIN" line

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Error: authentication failed"
AUTH_CANCELLED = "501 5.7.0 Authentication cancelled"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode the response"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_UNKNOWN_MECH = "504 5.5.4 Unrecognized authentication type"
AUTH_ALREADY = "503 5.5.1 Already authenticated"

LOGIN_USER_PROMPT = "334 VXNlcm5hbWU6"  # base64 of "Username:"
LOGIN_PASSWORD_PROMPT = "334 UGFzc3dvcmQ6"  # base64 of "Password:"


class SaslError(MailmoatError):
    """A client response that cannot authenticate; `reply` is what the server answers."""

    def __init__(self, reason: str, reply: str = AUTH_FAILED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


def is_cancel(line: str) -> bool:
    """A lone '*' cancels the exchange (RFC 4954 section 4); answer AUTH_CANCELLED."""
    return line.strip() == "*"


def _decode(b64: str) -> str:
    text = b64.strip()
    if text == "=":  # RFC 4954: an empty initial response
        return ""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise SaslError("response is not base64", AUTH_BAD_BASE64) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("response is not UTF-8", AUTH_BAD_BASE64) from None


def decode_plain(initial: str) -> tuple[str, str]:
    """(user, password) from a PLAIN response: base64 of `authzid NUL authcid NUL passwd`.

    Proxy authorization is not supported: the authzid must be empty or the authcid itself.
    """
    parts = _decode(initial).split("\0")
    if len(parts) != 3:
        raise SaslError(f"PLAIN response has {len(parts) - 1} NUL separator(s), expected 2",
                        AUTH_BAD_BASE64)
    authzid, user, password = parts
    if not user or not password:
        raise SaslError("PLAIN response has an empty user name or password")
    if authzid and authzid != user:
        raise SaslError(f"authorization identity {authzid!r} differs from user {user!r} "
                        "(proxy authorization is not supported)")
    return user, password


def decode_login_step(b64: str) -> str:
    """The user name or password a LOGIN client sent in answer to a 334 prompt."""
    value = _decode(b64)
    if not value:
        raise SaslError("LOGIN response is empty")
    if "\0" in value:
        raise SaslError("LOGIN response contains a NUL character")
    return value
