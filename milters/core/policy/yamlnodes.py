"""Read YAML as a node tree that remembers where every value stands in the file.

We never let PyYAML construct Python objects: the schema reads each scalar's raw text
itself, so `mode: off` or `country: NO` are not silently turned into booleans, duplicate
keys are errors instead of "last one wins", and every problem can name FILE:LINE:COL.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError

Node = yaml.Node
MappingNode = yaml.MappingNode
SequenceNode = yaml.SequenceNode
ScalarNode = yaml.ScalarNode

MAX_POLICY_BYTES = 4 * 1024 * 1024  # a policy is hand-written; anything larger is a mistake


class Problems:
    """Collects every problem found in one file, each as FILE:LINE:COL: path: problem (got X)."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._found: list[tuple[int, int, str]] = []

    @property
    def lines(self) -> list[str]:
        """Every problem, in file order."""
        return [text for _, _, text in sorted(self._found, key=lambda item: item[:2])]

    def add(self, node: Node | None, path: str, problem: str, got: object = None) -> None:
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
        text = f"{self.filename}:{line}:{col}: {path or '(top)'}: {problem}"
        if got is not None:
            text += f" (got {describe(got)})"
        self._found.append((line, col, text))

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def describe(value: object) -> str:
    """Show what the user wrote, shortened so one error stays one readable line."""
    if isinstance(value, MappingNode):
        return "a mapping"
    if isinstance(value, SequenceNode):
        return "a list"
    if isinstance(value, ScalarNode):
        value = value.value if value.value != "" else "nothing"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_duplicate_keys(node: Node, problems: Problems, path: str = "") -> None:
    if isinstance(node, MappingNode):
        seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if key in seen:
                first = seen[key].start_mark.line + 1
                problems.add(key_node, child, f"duplicate key; it is already set on line {first}",
                             key)
            seen[key] = key_node
            _check_duplicate_keys(value_node, problems, child)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, problems, f"{path}[{index}]")


def compose_text(text: str, filename: str) -> Node | None:
    """Parse YAML text into nodes; syntax errors become ConfigError with the file position."""
    problems = Problems(filename)
    if "\x00" in text:
        problems.add(None, "(syntax)", "the file contains NUL bytes; is it really YAML?")
        problems.raise_if_any()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.context_mark and exc.problem:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        hint = ""
        if "found character '\\t'" in problem:
            hint = "; indent with spaces, YAML does not allow tabs"
        elif "found ':'" in problem or "but got ':'" in problem:
            hint = "; quote values that contain ':' such as IPv6 addresses (\"::1/128\")"
        raise ConfigError([f"{filename}:{line}:{col}: (syntax): {problem}{hint}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{filename}:1:1: (syntax): {exc}"]) from None
    if node is not None:
        _check_duplicate_keys(node, problems)
    problems.raise_if_any()
    return node


def compose_file(path: Path) -> Node | None:
    """Read and parse one YAML file, with size and encoding checks that name the file."""
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{name}:1:1: (file): cannot read it: {exc.strerror or exc}"]) from None
    if len(data) > MAX_POLICY_BYTES:
        raise ConfigError([f"{name}:1:1: (file): {len(data)} bytes is too large for a policy "
                           f"(limit {MAX_POLICY_BYTES})"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{name}:{line}:1: (file): not UTF-8 text (byte {exc.start}); "
                           "save the file as UTF-8"]) from None
    return compose_text(text, name)
