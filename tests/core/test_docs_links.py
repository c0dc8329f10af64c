"""The README stays a page for users (at most 300 lines, every node's help page linked), and every relative link in
README.md, docs/, bench/RESULTS.md and the node help pages names a file that exists."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import NODE_IDS, REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "RESULTS.md",
         *sorted((REPO / "web" / "docs").glob("*.md"))]
# [text](target) outside code spans; a target with a scheme (https:, mailto:) or only an anchor is not a file
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_at_most_300_lines():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move details to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_names_a_file(page):
    missing = [t for t in relative_links(page) if not (page.parent / unquote(t.split("#", 1)[0])).exists()]
    assert missing == [], f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


def test_readme_links_every_nodes_help_page():
    links = set(relative_links(REPO / "README.md"))
    assert [n for n in NODE_IDS if f"web/docs/{n}.md" not in links] == []


def test_the_docs_folder_is_linked_from_the_readme_or_another_page():
    """A guide nobody links to is lost."""
    linked = {(p.parent / unquote(t.split("#", 1)[0])).resolve() for p in PAGES for t in relative_links(p)}
    orphans = [p.name for p in (REPO / "docs").glob("*.md") if p.resolve() not in linked]
    assert orphans == []
