"""README and docs tell the truth: the config table matches TrainConfig, the first commands are the real ones,
and every relative link points at a file (and a heading) that exists."""

import re
from pathlib import Path

import pytest

from kto_lite.config import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIG_DOC = ROOT / "docs" / "config.md"  # the home of the generated config table
# The Markdown files whose links must resolve: the README, the docs, and the benchmarks' pages.
LINKED_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
               *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


# ---------------------------------------------------------------------- the first commands and the config table
def test_config_table_is_generated_from_trainconfig():
    start = "<!-- config-table: generated from TrainConfig; tests/test_readme.py keeps it in sync -->\n"
    table = CONFIG_DOC.read_text().split(start)[1].split("<!-- /config-table -->")[0].strip()
    assert table == markdown_table(), "regenerate with: python -c 'from kto_lite.config import markdown_table; print(markdown_table())'"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    blocks = README.split("```bash\n")
    app, tests = blocks[1].split("\n```")[0], blocks[2].split("\n```")[0]
    assert app.endswith("python -m ui") and tests.endswith("python -m pytest")
    assert README.index(app) < 400  # at the very top
    assert tests in (ROOT / ".ci" / "run").read_text()


# ---------------------------------------------------------------------- links
def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are code, not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link as written, the file it points at, its #anchor or "") for each link that is not a URL."""
    links = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        links.append((target, (path.parent / file).resolve() if file else path, anchor))
    return links


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file: lower case, punctuation dropped, spaces to -."""
    anchors = set()
    for line in prose(path.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(doc):
    missing = [target for target, file, _ in relative_links(doc) if not file.exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_to_a_section_names_a_heading_of_its_file(doc):
    missing = [target for target, file, anchor in relative_links(doc)
               if anchor and file.suffix == ".md" and file.exists() and anchor not in heading_anchors(file)]
    assert not missing, f"{doc.relative_to(ROOT)} links to sections that do not exist: {missing}"


def test_the_link_check_sees_links_and_broken_ones(tmp_path):
    """The checks above would pass on a page whose links they cannot see: show that they see them."""
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading) ![img](gone.png) [web](https://example.org) `[code](nowhere.md)`\n"
                    "[bad anchor](there.md#nope)\n```\n[in a block](nowhere.md)\n```\n")
    links = relative_links(page)
    assert [target for target, _, _ in links] == ["there.md#a-heading", "gone.png", "there.md#nope"]
    assert [t for t, file, _ in links if not file.exists()] == ["gone.png"]
    assert heading_anchors(tmp_path / "there.md") == {"a-heading"}
