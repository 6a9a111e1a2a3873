"""Every shell example in README.md and docs/ runs, and prints what the page says it prints."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.harness.doc_examples import (Example, environment, matches, parse, run,
                                        unfenced_commands, workdir)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
SAMPLES = ROOT / "samples"
README = ROOT / "README.md"
PAGES = [README] + sorted(DOCS.rglob("*.md"))
BIN = Path(sys.executable).parent  # the virtualenv's bin: `mailmoat` as set-up leaves it
# A file an example names: a word ending in one of these.
NAMED_FILE = re.compile(r"(?<![\w/.-])([\w./-]+\.(?:yaml|yml|eml|txt|pem|key))\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _missing_files(example: Example, cwd: Path) -> list[str]:
    """Files the command names that are not there when it runs (made by an earlier
    example, or shipped in docs/examples/), except those it writes itself (> FILE)."""
    return [name for name in NAMED_FILE.findall(example.command)
            if not (cwd / name).exists()
            and not re.search(rf">\s*{re.escape(name)}", example.command)]


def _page_examples(page: Path) -> list[Example]:
    return parse(page, page.read_text(encoding="utf-8"))[0]


@pytest.mark.parametrize("page", [p for p in PAGES if _page_examples(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_of_each_page_print_what_the_page_shows(page: Path,
                                                             tmp_path: Path) -> None:
    cwd = workdir(EXAMPLES, tmp_path / "work", SAMPLES)
    env = environment(BIN, ROOT, tmp_path)
    for example in _page_examples(page):
        where = f"{page.relative_to(ROOT)}:{example.line}: $ {example.command}"
        assert _missing_files(example, cwd) == [], f"{where}: names files that do not exist"
        status, output = run(example, cwd, env)
        assert matches(example.expected, output), f"{where}\n--- printed:\n{output}"
        assert status == example.status, f"{where}\nexit {status}, the page says " \
                                         f"{example.status}\n{output}"


def test_the_docs_have_examples_to_run() -> None:
    assert sum(len(_page_examples(p)) for p in PAGES) >= 10


def test_the_readme_examples_run_too() -> None:
    # The README is the front door: its first-message example runs; the rest moved to docs/.
    assert len(_page_examples(README)) >= 2
    assert sum(len(_page_examples(p)) for p in PAGES) >= 59


def test_no_shell_block_is_left_unchecked_without_saying_why() -> None:
    unchecked = [u for page in PAGES for u in parse(page, page.read_text("utf-8"))[1]]
    assert unchecked == []


def test_no_command_hides_in_an_indented_block() -> None:
    hidden = [f"{page.relative_to(ROOT)}:{line}" for page in PAGES
              for line in unfenced_commands(page.read_text("utf-8"))]
    assert hidden == []


# A path into the repository that the README names in its text: `samples/x.eml`,
# `tests/integration/test_serve.py`, `packaging/systemd/`, `tests/unit/test_sign_*.py`.
REPO_PATH = re.compile(r"(?<![\w/.-])((?:samples|policies|docs|bench|packaging|scripts|tests|"
                       r"milters|mta)/[\w./@*-]*[\w/*])")


def repo_paths_missing(text: str, root: Path) -> list[str]:
    return sorted({path for path in REPO_PATH.findall(text)
                   if not next(root.glob(path), None)})


def test_every_file_the_readme_names_exists() -> None:
    assert repo_paths_missing(README.read_text("utf-8"), ROOT) == []


def test_every_link_in_the_docs_leads_to_a_file_that_exists() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


# The checker itself: it must see drift, not just pass.

def _one(text: str) -> Example:
    examples, _ = parse(Path("t.md"), text)
    assert len(examples) == 1
    return examples[0]


def test_placeholders_match_ids_times_and_elided_lines() -> None:
    example = _one("```console\n$ x\nqueued as <ID> at <TIME>\n...\ndone in <N>s\n```\n")
    assert matches(example.expected, "queued as 4F2A1b at 2026-12-06T15:22:37Z\na\nb\n"
                                     "done in 0.25s\n")
    assert matches(example.expected, "queued as 4F2A1b at 15:22:37\ndone in 3s\n")


def test_changed_output_is_caught() -> None:
    example = _one("```console\n$ x\npolicy.yaml: ok (3 rules, 9 tests)\n```\n")
    assert matches(example.expected, "policy.yaml: ok (3 rules, 9 tests)\n")
    assert not matches(example.expected, "policy.yaml: ok (4 rules, 9 tests)\n")
    assert not matches(example.expected, "policy.yaml: ok (3 rules, 9 tests)\nextra line\n")
    assert not matches(example.expected, "")


def test_a_placeholder_inside_a_line_never_swallows_other_lines() -> None:
    example = _one("```console\n$ x\nfirst ... last\n```\n")
    assert matches(example.expected, "first and so on last\n")
    assert not matches(example.expected, "first\nsecond last\n")


def test_an_id_placeholder_takes_no_spaces_or_punctuation() -> None:
    example = _one("```console\n$ x\nid=<ID>.\n```\n")
    assert not matches(example.expected, "id=4F 2A.\n")
    assert not matches(example.expected, "id=.\n")


def test_regex_characters_in_the_page_are_text() -> None:
    example = _one("```console\n$ x\n[a+b] (c)*\n```\n")
    assert matches(example.expected, "[a+b] (c)*\n")
    assert not matches(example.expected, "a+b c\n")


def test_exit_status_and_continued_commands_are_read() -> None:
    example = _one("```console\n$ mailmoat policy check \\\n    bad.yaml\nbad\n[exit 1]\n```\n")
    assert example.command == "mailmoat policy check \\\n    bad.yaml"
    assert (example.expected, example.status) == (("bad",), 1)


def test_a_wrong_exit_status_is_caught(tmp_path: Path) -> None:
    example = _one("```console\n$ exit 3\n```\n")
    status, _ = run(example, tmp_path, environment(BIN, ROOT, tmp_path))
    assert (status, example.status) == (3, 0)


def test_a_console_block_without_a_command_is_an_error() -> None:
    with pytest.raises(ValueError, match="t.md:2: a console block must start with"):
        parse(Path("t.md"), "```console\nno dollar\n```\n")


def test_a_file_an_example_names_must_exist_when_it_runs(tmp_path: Path) -> None:
    example = _one("```console\n$ mailmoat policy check gw.yaml > out.txt\n```\n")
    assert _missing_files(example, tmp_path) == ["gw.yaml"]
    (tmp_path / "gw.yaml").write_text("x")
    assert _missing_files(example, tmp_path) == []


def test_a_command_in_an_indented_block_is_found() -> None:
    text = ("Config:\n\n    gateway: {hostname: x}\n\nRun:\n\n    $ mailmoat policy check p.yaml\n"
            "    ok\n\n    .venv/bin/python bench/mta.py\n\n```sh\n    mailmoat serve\n```\n")
    assert unfenced_commands(text) == [7, 10]


def test_a_path_the_readme_names_must_exist(tmp_path: Path) -> None:
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "plain-en.eml").write_text("x")
    text = ("see `samples/plain-en.eml` and samples/gone.eml, or docs/recipes/x.md, "
            "samples/plain-*.eml and samples/attach-*")
    assert repo_paths_missing(text, tmp_path) == ["docs/recipes/x.md", "samples/attach-*",
                                                  "samples/gone.eml"]


def test_a_shell_block_needs_its_reason_not_to_run() -> None:
    _, unchecked = parse(Path("t.md"), "```sh\nrm -rf /\n```\n")
    assert [(u.line, u.language) for u in unchecked] == [(1, "sh")]
    _, unchecked = parse(Path("t.md"), "<!-- not run: needs root -->\n```sh\nx\n```\n")
    assert unchecked == []
    _, unchecked = parse(Path("t.md"), "```\n$ mailmoat serve\n```\n\n```text\nout\n```\n")
    assert [(u.line, u.language) for u in unchecked] == [(1, "")]
