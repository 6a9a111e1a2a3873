"""One audit record, its canonical form and its hash.

A record's hash is sha256(prev_hash + canonical JSON of the record), where the canonical
JSON holds every value but the two hashes, with sorted keys, no whitespace, UTF-8. Each
record thus vouches for the one before it: a changed, removed or reordered record breaks
the chain at the first place it touches.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64  # the previous hash of the first record ever written
# A text value longer than this is cut (a 1 MB header must not make a 1 MB record).
FIELD_CAP = 2000
MAX_FIELDS = 50
MAX_DEPTH = 3
# Values of fields named like these are never recorded: a password notice's password, a
# token in a link. Matched anywhere in the name, case-insensitively.
SECRET_NAME = re.compile(r"passw|secret|token|credential|api_?key|private", re.I)


@dataclass(frozen=True)
class AuditRecord:
    seq: int  # 1, 2, 3 ... in chain order
    time: float  # unix time
    event: str  # "queued", "milter_verdict", "attachments", "delivered", "released", ...
    queue_id: str | None
    message_id: str | None
    actor: str | None  # "mailmoat/smtpd", "mailmoat/attachments", "console:alice", "cli:root"
    source: str | None  # the client's or user's IP address, when there is one
    fields: dict[str, Any]  # the event's own values (JSON-able); never a password
    prev_hash: str  # hex sha256 of the previous record (GENESIS for the first)
    hash: str  # hex sha256 over prev_hash + the canonical JSON of this record

    def body(self) -> dict[str, Any]:
        """What the hash covers: everything but the two hashes."""
        return {"seq": self.seq, "time": self.time, "event": self.event,
                "queue_id": self.queue_id, "message_id": self.message_id,
                "actor": self.actor, "source": self.source, "fields": self.fields}

    def expected_hash(self) -> str:
        return chain_hash(self.prev_hash, self.body())

    def to_json(self) -> str:
        """The whole record as one JSON text (how Redis keeps it)."""
        return canonical({**self.body(), "prev_hash": self.prev_hash, "hash": self.hash})

    @classmethod
    def from_json(cls, text: str | bytes) -> "AuditRecord":
        data = json.loads(text)
        return cls(seq=data["seq"], time=data["time"], event=data["event"],
                   queue_id=data["queue_id"], message_id=data["message_id"],
                   actor=data["actor"], source=data["source"], fields=data["fields"],
                   prev_hash=data["prev_hash"], hash=data["hash"])


# One encoder made once: json.dumps() with options builds a new one on every call.
canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_encode_str = json.encoder.encode_basestring  # what canonical() does to a str, directly


def _scalar(value: Any) -> str:
    """canonical(value) for the record's own str/None values, without the encoder's walk."""
    if value is None:
        return "null"
    return _encode_str(value) if type(value) is str else canonical(value)


def chain_hash(prev_hash: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(body).encode("utf-8")
                          ).hexdigest()


@dataclass(frozen=True)
class Pending:
    """A record appended but not yet written: it gets its seq and hashes when written."""

    time: float
    event: str
    queue_id: str | None
    message_id: str | None
    actor: str | None
    source: str | None
    fields: dict[str, Any]

    def seal(self, seq: int, prev_hash: str) -> AuditRecord:
        # canonical(body) written out in its sorted key order, each value encoded once
        # (tests/unit/test_audit_log.py checks it equals the plain form verify() uses).
        text = (f'{{"actor":{_scalar(self.actor)},"event":{_scalar(self.event)},'
                f'"fields":{canonical(self.fields)},"message_id":{_scalar(self.message_id)},'
                f'"queue_id":{_scalar(self.queue_id)},"seq":{seq},'
                f'"source":{_scalar(self.source)},"time":{float.__repr__(self.time)}}}')
        digest = hashlib.sha256(prev_hash.encode("ascii") + text.encode("utf-8")).hexdigest()
        return AuditRecord(seq, self.time, self.event, self.queue_id, self.message_id,
                           self.actor, self.source, self.fields, prev_hash, digest)


def clean_text(value: Any, cap: int = FIELD_CAP) -> str:
    """A value as text that JSON and UTF-8 can carry (8-bit and lone surrogates escaped,
    CR/LF/NUL kept: JSON escapes them), cut at `cap` characters."""
    if type(value) is str and value.isascii() and len(value) <= cap:
        return value  # the usual case, at once
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", "backslashreplace")
    else:
        try:
            text = str(value)
        except Exception:  # a value that cannot print itself must not stop the batch
            text = f"<unprintable {type(value).__name__}>"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (bytes decoded with surrogateescape)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > cap:
        text = f"{text[:cap]}...[{len(text) - cap} more characters cut]"
    return text


def clean_optional(value: Any) -> str | None:
    return None if value is None else clean_text(value, 500)


def clean_fields(fields: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """The fields fit for the log: secrets dropped (by name), values JSON-able and capped."""
    out: dict[str, Any] = {}
    for key, value in list(fields.items())[:MAX_FIELDS]:
        name = clean_text(key, 100)
        if value is None or SECRET_NAME.search(name):
            continue
        out[name] = _clean_value(value, depth)
    return out


def _clean_value(value: Any, depth: int) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else str(value)  # JSON readers lose more
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, dict) and depth < MAX_DEPTH:
        return clean_fields(value, depth + 1)
    if isinstance(value, (list, tuple, set, frozenset)) and depth < MAX_DEPTH:
        items = list(value)[:MAX_FIELDS]
        return [_clean_value(v, depth + 1) for v in items]
    return clean_text(value)
