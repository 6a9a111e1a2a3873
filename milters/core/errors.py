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
    └── MilterProtocolError  a milter peer broke the Sendmail milter protocol
"""
from __future__ import annotations


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
