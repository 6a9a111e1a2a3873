"""The one exception tree of mailmoat.

Every error the product raises on purpose derives from MailmoatError, so the
command line can turn any of them into a clear message and an exit code
instead of a traceback:

    MailmoatError
    ├── ConfigError          a config or policy file is unusable; carries every problem found
    ├── StoreError           the state store (memory, SQLite, Redis) failed
    │   └── StoreUnavailable the store cannot be reached right now (retry or fall back)
    ├── MessageError         a message cannot be parsed or is over a limit
    │   └── AuthResultsError an Authentication-Results header cannot be read (RFC 8601)
    ├── MilterProtocolError  a milter peer broke the Sendmail milter protocol
    ├── LoginError           a console login did not succeed
    │   ├── LoginRefused     wrong name or password, no role, or the directory is down
    │   └── LoginThrottled   too many failures for this name or source address
    └── ReviewError          an outbound review record is unusable (bad kind, no approver)
        ├── ReviewRefused    a decision or escalation is refused (decided, wrong person, ...)
        └── TokenInvalid     a review link's token is forged, altered, expired or not this one
"""
from __future__ import annotations

import math


class MailmoatError(Exception):
    """Base of every deliberate mailmoat error."""


class ConfigError(MailmoatError):
    """A config or policy file failed validation; `problems` lists them all."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StoreError(MailmoatError):
    """The state store failed in a way that retrying will not fix."""


class StoreUnavailable(StoreError):
    """The state store cannot be reached (connection refused, timeout)."""


class MessageError(MailmoatError):
    """A message cannot be parsed or breaks a configured limit."""


class AuthResultsError(MessageError):
    """An Authentication-Results header does not follow RFC 8601 (or not as we write it)."""


class MilterProtocolError(MailmoatError):
    """A milter peer sent something the milter protocol does not allow."""


class OutputFileError(MailmoatError):
    """A file a command was asked to write (scan --reinjected-dir) could not be written."""


class LoginError(MailmoatError):
    """A console login did not succeed; str() is fit to show the person logging in."""


class LoginRefused(LoginError):
    """The login is refused: the same message for an unknown name and a wrong password.
    `reason` is for the log only (never shown: it would tell which names exist)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class LoginThrottled(LoginError):
    """Too many failed logins for this name or this source; `retry_after` in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins; try again in {math.ceil(retry_after)} s")
        self.retry_after = retry_after


class ReviewError(MailmoatError):
    """An outbound review record cannot be made or used as given."""


class ReviewRefused(ReviewError):
    """A decision on a review is refused. `reason` is a short code the console maps to its
    page (unknown, decided, wrong_person, self_approval, expired, not_due, wrong_action,
    token_used, no_next_approver); str() says it in a sentence."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TokenInvalid(ReviewError):
    """A review link's token is not one we issued for this use: `reason` is malformed,
    signature, expired or mismatch (the page says only that the link cannot be used)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
