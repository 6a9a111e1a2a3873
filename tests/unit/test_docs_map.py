"""The docs are one map: every page is reachable from the README or docs/README.md (the
index), and every repository path a page names in its text exists."""
from __future__ import annotations

import re
from pathlib import Path

from tests.unit.test_docs_examples import LINK, repo_paths_missing

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
INDEX = ROOT / "docs" / "README.md"


def linked_pages(page: Path) -> set[Path]:
    """The local files a page links to, resolved from the page's own folder."""
    found = set()
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        path = target.split("#")[0]
        if path and not re.match(r"[a-z]+:", path):
            found.add((page.parent / path).resolve())
    return found


def unlinked(docs: Path, front_doors: list[Path]) -> list[str]:
    reachable = set().union(*(linked_pages(door) for door in front_doors))
    return sorted(str(page.relative_to(docs)) for page in docs.rglob("*.md")
                  if page.resolve() not in reachable and page not in front_doors)


def without_links(text: str) -> str:
    """A page's text without its link targets: those are relative to the page and are
    checked by test_docs_examples; what is left names paths from the repository's root."""
    return LINK.sub("]()", text)


def test_every_docs_page_is_linked_from_the_readme_or_the_index() -> None:
    assert unlinked(ROOT / "docs", [README, INDEX]) == []


def test_every_repository_path_a_docs_page_names_exists() -> None:
    missing = {str(page.relative_to(ROOT)): repo_paths_missing(without_links(
        page.read_text(encoding="utf-8")), ROOT) for page in (ROOT / "docs").rglob("*.md")}
    assert {page: paths for page, paths in missing.items() if paths} == {}


# The checkers themselves must see what they are for.

def test_a_page_nobody_links_is_found(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "milters").mkdir(parents=True)
    (docs / "README.md").write_text("[a](a.md) and [auth](milters/auth.md#dmarc)\n")
    for name in ("a.md", "milters/auth.md", "milters/sign.md", "orphan.md"):
        (docs / name).write_text("# x\n")
    readme = tmp_path / "README.md"
    readme.write_text("[docs](docs/README.md), [orphan](https://example.com/docs/orphan.md)\n")
    assert unlinked(docs, [readme, docs / "README.md"]) == ["milters/sign.md", "orphan.md"]


def test_a_path_in_the_text_is_checked_but_a_relative_link_is_not(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    text = "see [auth](milters/auth.md) and `tests/gone.py`, `milters/gone/`"
    assert repo_paths_missing(without_links(text), tmp_path) == ["milters/gone/", "tests/gone.py"]
