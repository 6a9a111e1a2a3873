"""Runs the shell examples written in Markdown and compares what they print with the page.

An example is a ```console block: `$ command` lines (a trailing backslash continues one),
each followed by the output the page shows (stdout and stderr together). Placeholders:

    ...          on a line of its own: any number of lines (also none)
    ...          inside a line: any text on that line
    <ID>         a queue ID or another token of letters and digits
    <TIME>       a date and/or time: 2026-12-06T15:22:37Z, 15:22:37, 2026-12-06
    <N>          a number

A command that must fail ends its output with `[exit N]`; without it the status must be 0.
The commands of one page run in order, in one directory holding a copy of docs/examples/
and samples/, so a later command sees what an earlier one wrote. Any other fenced shell
block (sh, bash, shell, or any block with `$ ` prompts) must carry `<!-- not run: why -->`
on the line above it, and a command may not hide in an indented (unfenced) block, so no
example is silently left unchecked.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!-- not run: .+ -->$")
SHELL_LANGUAGES = {"sh", "bash", "shell", "zsh"}
EXIT = re.compile(r"^\[exit (\d+)\]$")
PLACEHOLDERS = {"<ID>": r"[0-9A-Za-z]+", "<N>": r"-?[0-9]+(?:\.[0-9]+)?",
                "<TIME>": r"[0-9]{2,4}[0-9TZ:.+\-]*"}
_TOKEN = re.compile(r"\.\.\.|<ID>|<N>|<TIME>")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int  # of the command, 1-based
    command: str
    expected: tuple[str, ...]
    status: int


@dataclass(frozen=True)
class Unchecked:
    page: Path
    line: int
    language: str


def _line_pattern(line: str) -> str:
    out, last = [], 0
    for match in _TOKEN.finditer(line):
        out.append(re.escape(line[last:match.start()]))
        token = match.group()
        out.append("[^\n]*?" if token == "..." else PLACEHOLDERS[token])
        last = match.end()
    out.append(re.escape(line[last:]))
    return "".join(out)


def output_pattern(expected: tuple[str, ...]) -> re.Pattern[str]:
    """The whole output as one regular expression, anchored at both ends."""
    parts = []
    for line in expected:
        if line.strip() == "...":
            parts.append("(?:[^\n]*\n)*?")  # whole lines, possibly none
        else:
            parts.append(_line_pattern(line.rstrip()) + "\n")
    return re.compile("".join(parts) + r"\Z")


def matches(expected: tuple[str, ...], actual: str) -> bool:
    lines = [line.rstrip() for line in actual.splitlines()]
    text = "".join(line + "\n" for line in lines)
    return output_pattern(expected).match(text) is not None


def parse(page: Path, text: str) -> tuple[list[Example], list[Unchecked]]:
    examples: list[Example] = []
    unchecked: list[Unchecked] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        language, start = fence.group(1), index
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        body = lines[start + 1:end]
        if language == "console":
            examples += _examples(page, start + 2, body)
        elif (language in SHELL_LANGUAGES or any(line.startswith("$ ") for line in body)) \
                and not (start > 0 and NOT_RUN.match(lines[start - 1].strip())):
            # A `$ ` prompt in a plain or text block is a command example too.
            unchecked.append(Unchecked(page, start + 1, language))
        index = end + 1
    return examples, unchecked


def _examples(page: Path, first: int, body: list[str]) -> list[Example]:
    found: list[Example] = []
    i = 0
    while i < len(body):
        if not body[i].startswith("$ "):
            raise ValueError(f"{page}:{first + i}: a console block must start with '$ ' "
                             f"(got {body[i]!r})")
        line_no, command = first + i, body[i][2:]
        while command.endswith("\\") and i + 1 < len(body):
            i += 1
            command += "\n" + body[i]  # bash reads the backslash-newline itself
        i += 1
        output: list[str] = []
        while i < len(body) and not body[i].startswith("$ "):
            output.append(body[i])
            i += 1
        status = 0
        if output and EXIT.match(output[-1].strip()):
            status = int(EXIT.match(output[-1].strip()).group(1))  # type: ignore[union-attr]
            output.pop()
        found.append(Example(page, line_no, command, tuple(output), status))
    return found


# An indented code line that reads as a command someone would type (a `$ ` prompt, a root
# `# mailmoat` prompt, or a program the README tells you to run), not as a config line.
COMMAND_LINE = re.compile(r"^(?:\$ |# mailmoat |mailmoat |\.venv/bin/|\./scripts/|swaks |"
                          r"PYTHONPATH=|python3? )")


def unfenced_commands(text: str) -> list[int]:
    """1-based lines of commands written in an indented block instead of a fenced one."""
    found, fenced, previous_blank = [], False, True
    in_block = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        indented = re.match(r"^( {4,}|\t)(\S.*)$", line)
        # An indented block starts after a blank line; a list item's continuation does not.
        in_block = bool(indented) and (in_block or previous_blank)
        if in_block and indented and COMMAND_LINE.match(indented.group(2)):
            found.append(number)
        previous_blank = not line.strip()
    return found


def workdir(examples_dir: Path, into: Path, *more: Path) -> Path:
    """A copy of docs/examples/ (and of each of `more`, by its name) to run a page in."""
    shutil.copytree(examples_dir, into)
    for extra in more:
        shutil.copytree(extra, into / extra.name)
    return into


def environment(bin_dir: Path, checkout: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MAILMOAT"))}
    # PYTHONPATH: the checkout under test, ahead of whatever the virtualenv has installed.
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(checkout),
               HOME=str(home), TZ="UTC", LANG="C.UTF-8", LC_ALL="C.UTF-8", COLUMNS="80")
    return env


def run(example: Example, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run(["bash", "-c", example.command], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=120)
    return result.returncode, result.stdout
