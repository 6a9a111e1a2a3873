"""A small schema language that reports every problem with its position and the fix.

Each Spec reads one YAML node and returns the checked Python value, or INVALID after
recording a problem. A Struct rejects unknown keys (a typo must never switch a
protection off) and suggests the key that was probably meant.
"""
from __future__ import annotations

import difflib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..secrets import secret_key_hint
from ..verdict import SmtpReply
from .matching import AddressPattern, parse_address_pattern, parse_network_pattern
from .yamlnodes import MappingNode, Node, Problems, ScalarNode, SequenceNode

INVALID: Any = type("Invalid", (), {"__repr__": lambda self: "INVALID"})()
_NULLS = {"", "~", "null", "Null", "NULL"}
_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}


class Spec:
    """Reads and checks one node."""

    expected = "a value"

    def read(self, node: Node, path: str, problems: Problems) -> Any:
        raise NotImplementedError  # every concrete spec overrides read()


class Scalar(Spec):
    """A single value; subclasses turn its raw text into a Python value or raise ValueError."""

    def read(self, node: Node, path: str, problems: Problems) -> Any:
        if not isinstance(node, ScalarNode):
            problems.add(node, path, f"expected {self.expected}", node)
            return INVALID
        if node.style is None and node.value in _NULLS:
            problems.add(node, path, f"a value is required here: {self.expected}", node)
            return INVALID
        try:
            return self.parse(node.value)
        except ValueError as exc:
            problems.add(node, path, str(exc) or f"expected {self.expected}", node)
            return INVALID

    def parse(self, text: str) -> Any:
        return text


class Str(Scalar):
    def __init__(self, choices: tuple[str, ...] | None = None, max_len: int = 1000) -> None:
        self.choices = choices
        self.max_len = max_len
        self.expected = f"one of {', '.join(choices)}" if choices else "a text"

    def parse(self, text: str) -> str:
        if self.choices is not None and text not in self.choices:
            near = difflib.get_close_matches(text, self.choices, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ValueError(f"must be one of {', '.join(self.choices)}{hint}")
        if len(text) > self.max_len:
            raise ValueError(f"longer than {self.max_len} characters")
        return text


class Bool(Scalar):
    expected = "true or false"

    def parse(self, text: str) -> bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")


class Number(Scalar):
    def __init__(self, minimum: float | None = None, maximum: float | None = None,
                 integer: bool = False) -> None:
        self.minimum, self.maximum, self.integer = minimum, maximum, integer
        self.expected = "a whole number" if integer else "a number"

    def parse(self, text: str) -> float | int:
        try:
            value: float | int = int(text) if self.integer else float(text)
        except ValueError:
            raise ValueError(f"expected {self.expected}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected {self.expected}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.maximum:g}")
        return value


_UNITS = {"ms": 0.001, "msec": 0.001, "millisecond": 0.001,
          "s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
          "hour": 3600, "d": 86400, "day": 86400, "w": 604800, "week": 604800}
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$")


def parse_duration(text: str) -> float:
    """'500ms', '30s', '5m', '1h', '2d', '1w' (or 'mins', 'hours' ...) or plain seconds ->
    seconds. The whole unit is looked up first, so '500ms' is never read as 500 minutes."""
    match = _DURATION_RE.match(text.lower())
    unit = match.group(2) if match else ""
    if unit not in _UNITS and unit.endswith("s"):
        unit = unit[:-1]  # a plural
    if not match or (unit and unit not in _UNITS):
        raise ValueError("expected a duration like 30s, 5m, 1h or 2d")
    return float(match.group(1)) * _UNITS.get(unit or "s", 1)


class Duration(Scalar):
    expected = "a duration like 30s, 5m, 1h or 2d"

    def __init__(self, minimum: float = 0.0) -> None:
        self.minimum = minimum

    def parse(self, text: str) -> float:
        seconds = parse_duration(text)
        if seconds < self.minimum:
            raise ValueError(f"must be at least {self.minimum:g} seconds")
        return seconds


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2,
               "mb": 1024 ** 2, "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3,
               "gib": 1024 ** 3}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$")


def parse_size(text: str) -> int:
    """'10MB', '500KB', '2GB' or plain bytes -> bytes. KB, MB and GB count in 1024s, as mail
    servers' size limits and mail clients' file sizes do."""
    match = _SIZE_RE.match(text.lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError("expected a size like 500KB, 10MB or 1GB")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if value > 2 ** 40:
        raise ValueError("must be at most 1024GB")
    return int(value)


class Size(Scalar):
    expected = "a size like 500KB, 10MB or 1GB"

    def parse(self, text: str) -> int:
        return parse_size(text)


class PerSecond(float):
    """A rate in events per second that remembers how the policy wrote it ('300/hour')."""

    text: str

    def __new__(cls, value: float, text: str) -> "PerSecond":
        obj = super().__new__(cls, value)
        obj.text = text
        return obj

    def __str__(self) -> str:
        return self.text


class Rate(Scalar):
    """'60/min', '1000/hour', '5/s', '20000/day' -> events per second."""

    expected = "a rate like 60/min, 1000/hour or 5/s"

    def parse(self, text: str) -> float:
        count, sep, per = text.partition("/")
        if not sep:
            raise ValueError(f"expected {self.expected}")
        try:
            amount = float(count)
            period = parse_duration(per if per.strip()[0:1].isdigit() else "1" + per.strip())
        except (ValueError, IndexError):
            raise ValueError(f"expected {self.expected}") from None
        if amount <= 0 or period <= 0:
            raise ValueError("a rate must be above zero; to stop limiting, exempt the sender")
        return PerSecond(amount / period, text.strip())


class Network(Scalar):
    """An IP network in CIDR form, optionally negated with '!'."""

    expected = "an IP address or CIDR network like 192.0.2.0/24"

    def parse(self, text: str) -> Any:
        return parse_network_pattern(text)


class Address(Scalar):
    """A SaMMA-style address pattern: user@example.jp, @example.jp, !@bad.example.jp, *."""

    expected = "an address pattern like user@example.jp, @example.jp or !@example.jp"

    def parse(self, text: str) -> AddressPattern:
        return parse_address_pattern(text)


class Reply(Scalar):
    """An SMTP reply of a given class: '451 4.7.1 text'."""

    def __init__(self, classes: str = "45") -> None:
        self.classes = classes
        kinds = {"4": "temporary (4xx)", "5": "permanent (5xx)"}
        self.expected = "an SMTP reply like " + (
            "'451 4.7.1 Try again later'" if "4" in classes else "'550 5.7.1 Rejected'")
        self.kind = " or ".join(kinds[c] for c in classes)

    def parse(self, text: str) -> SmtpReply:
        try:
            reply = SmtpReply.parse(text)
        except ValueError as exc:
            raise ValueError(f"{exc}") from None
        if str(reply.code)[0] not in self.classes:
            raise ValueError(f"this reply must be {self.kind}")
        if "%" in reply.text:
            # libmilter silently drops a reply whose text has an undoubled '%'.
            raise ValueError("'%' is not allowed in reply text (libmilter drops such replies)")
        return reply


class ListOf(Spec):
    def __init__(self, item: Spec, min_items: int = 0, single_ok: bool = True,
                 check: Callable[[list[Any]], Any] | None = None) -> None:
        self.item, self.min_items, self.single_ok = item, min_items, single_ok
        self.check = check  # validates across items; raises ValueError with the fix
        self.expected = f"a list of {item.expected}"

    def read(self, node: Node, path: str, problems: Problems) -> Any:
        if isinstance(node, ScalarNode) and self.single_ok and not (
                node.style is None and node.value in _NULLS):
            items = [node]  # `allowlist: 192.0.2.0/24` means a list of one
        elif isinstance(node, ScalarNode) and node.style is None and node.value in _NULLS:
            items = []
        elif isinstance(node, SequenceNode):
            items = node.value
        else:
            problems.add(node, path, f"expected {self.expected}", node)
            return INVALID
        values = [self.item.read(item, f"{path}[{i}]", problems) for i, item in enumerate(items)]
        if len(values) < self.min_items:
            problems.add(node, path, f"needs at least {self.min_items} item(s)")
            return INVALID
        if any(v is INVALID for v in values):
            return INVALID
        if self.check is not None:
            try:
                return self.check(values)
            except ValueError as exc:
                problems.add(node, path, str(exc))
                return INVALID
        return values


REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()


@dataclass(frozen=True)
class Field:
    spec: Spec
    default: Any = REQUIRED
    # A callable default builds a fresh value each time (lists, nested structs).
    factory: Callable[[], Any] | None = None
    # What the key means, for docs/reference/config.md (milters/core/policy/docgen.py).
    doc: str = ""


class Struct(Spec):
    """A mapping with known keys; builds `build(**values)` when every key checks out."""

    def __init__(self, fields: dict[str, Field], build: Callable[..., Any] = dict,
                 expected: str = "a mapping of settings", pass_line: bool = False,
                 removed: dict[str, str] | None = None) -> None:
        self.fields, self.build, self.expected = fields, build, expected
        self.pass_line = pass_line  # give build() the mapping's line, for messages that cite it
        # Keys that used to exist -> what to write instead: refused with that text, never
        # accepted and ignored.
        self.removed = removed or {}

    def read(self, node: Node | None, path: str, problems: Problems) -> Any:
        if node is None or (isinstance(node, ScalarNode) and node.style is None
                            and node.value in _NULLS):
            pairs: list[tuple[Node, Node]] = []
        elif isinstance(node, MappingNode):
            pairs = node.value
        else:
            problems.add(node, path, f"expected {self.expected}", node)
            return INVALID
        values: dict[str, Any] = {}
        for key_node, value_node in pairs:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            field_spec = self.fields.get(key)
            if field_spec is None:
                problems.add(key_node, child, self._unknown_key_hint(key), key)
                values["\0invalid"] = INVALID
                continue
            values[key] = field_spec.spec.read(value_node, child, problems)
        for key, field_spec in self.fields.items():
            if key in values:
                continue
            if field_spec.factory is not None:
                values[key] = field_spec.factory()
            elif field_spec.default is REQUIRED:
                problems.add(node, path, f"missing required key '{key}' ({field_spec.spec.expected})")
                values[key] = INVALID
            else:
                values[key] = field_spec.default
        if any(v is INVALID for v in values.values()):
            return INVALID
        if self.pass_line:
            values["line"] = node.start_mark.line + 1 if node is not None else 0
        try:
            return self.build(**values)
        except ValueError as exc:  # a check across keys of this mapping failed
            problems.add(node, path, str(exc))
            return INVALID

    def _unknown_key_hint(self, key: str) -> str:
        if key in self.removed:
            return self.removed[key]
        secret = secret_key_hint(key, list(self.fields))
        if secret:
            return secret
        near = difflib.get_close_matches(key, list(self.fields), n=1, cutoff=0.6)
        if near:
            return f"unknown key; did you mean '{near[0]}'?"
        return f"unknown key; allowed here: {', '.join(self.fields)}"


class MapOf(Spec):
    """A mapping whose keys are data (domains, result names), each key and value checked."""

    def __init__(self, key: Scalar, value: Spec, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected

    def read(self, node: Node | None, path: str, problems: Problems) -> Any:
        if node is None or (isinstance(node, ScalarNode) and node.style is None
                            and node.value in _NULLS):
            return {}
        if not isinstance(node, MappingNode):
            problems.add(node, path, f"expected {self.expected}", node)
            return INVALID
        values: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.key.read(key_node, f"{path}.{key_node.value}", problems)
            values[key] = self.value.read(value_node, f"{path}.{key_node.value}", problems)
        if any(k is INVALID or v is INVALID for k, v in values.items()):
            return INVALID
        return values


class Pattern(Scalar):
    """A regular expression (Python syntax), searched case-insensitively."""

    expected = "a regular expression"

    def parse(self, text: str) -> re.Pattern[str]:
        if len(text) > 500:
            raise ValueError("longer than 500 characters")
        try:
            return re.compile(text, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None


class Either(Spec):
    """A word (a Scalar spec) or a mapping (a Struct spec): `neutralize: pass` or
    `neutralize: {links: defang, attachments: drop}`."""

    def __init__(self, word: Scalar, mapping: Struct) -> None:
        self.word, self.mapping = word, mapping
        self.expected = f"{word.expected}, or {mapping.expected}"

    def read(self, node: Node | None, path: str, problems: Problems) -> Any:
        if isinstance(node, MappingNode):
            return self.mapping.read(node, path, problems)
        if isinstance(node, ScalarNode):
            return self.word.read(node, path, problems)
        problems.add(node, path, f"expected {self.expected}", node)
        return INVALID


class GroupName(Scalar):
    """A directory group: its DN (normalized like console.ldap's roles) or its cn alone."""

    expected = "a group DN (cn=sales,ou=groups,dc=example,dc=jp) or a cn (sales)"

    def parse(self, text: str) -> str:
        text = text.strip()
        if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ValueError("a group is a DN or a cn, one line of text")
        if "=" not in text:
            if "," in text:
                raise ValueError("a cn has no comma; write the group's whole DN instead")
            return text.lower()
        from ldap3.core.exceptions import LDAPException  # noqa: PLC0415 -- only for DNs
        from ldap3.utils.dn import parse_dn  # noqa: PLC0415
        try:
            parts = parse_dn(text, strip=True)
        except LDAPException:
            raise ValueError("not a valid DN (RFC 4514)") from None
        return ",".join(f"{kind.lower()}={value.lower()}" for kind, value, _ in parts)


class CaFile(Str):
    """A PEM file of CA certificates, read now so a typo fails at start, not at delivery."""

    expected = "a PEM file of CA certificates"

    def __init__(self, base: Path) -> None:
        super().__init__()
        self.base = base

    def parse(self, text: str) -> Path:
        path = self.base / text
        try:
            ssl.create_default_context(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load CA certificates from {path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        return path
