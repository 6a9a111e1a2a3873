"""End-of-message edits a milter asks for, as plain values (applied by the pymilter adapter
behind Postfix/Sendmail, or by our own MTA's milter client)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from .verdict import Verdict


@dataclass(frozen=True)
class AddHeader:
    name: str
    value: str
    index: int | None = None  # None appends; 0 inserts at the very top (insheader)


@dataclass(frozen=True)
class ChangeHeader:
    name: str
    index: int  # 1 = the first header of that name, as in Postfix and libmilter
    value: str  # an empty value deletes the header


@dataclass(frozen=True)
class AddRecipient:
    address: str
    params: str | None = None


@dataclass(frozen=True)
class DeleteRecipient:
    address: str


@dataclass(frozen=True)
class ReplaceBody:
    # bytes, or a file read in pieces from its current position (a large new body that a
    # milter built on disk is never held whole in memory)
    body: bytes | BinaryIO


@dataclass(frozen=True)
class ChangeFrom:
    address: str
    params: str | None = None


@dataclass(frozen=True)
class Quarantine:
    reason: str


Edit = AddHeader | ChangeHeader | AddRecipient | DeleteRecipient | ReplaceBody | ChangeFrom | Quarantine


@dataclass
class EomResult:
    verdict: Verdict
    edits: list[Edit] = field(default_factory=list)
