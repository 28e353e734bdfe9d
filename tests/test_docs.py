"""The docs hold together: every relative link resolves, every anchor names a heading of its
page (GitHub's slugs), the README stays a front door that links every page, and every
`docs/PAGE.md#anchor` an error message names exists.

Markdown is read as GitHub reads it, as far as links and headings go: fenced code blocks and
code spans are text, not markup; a heading's anchor is its text lowercased, stripped of
punctuation but hyphens and underscores, spaces turned into hyphens, and a repeated slug gets
`-1`, `-2`, ...
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent
README = PROJECT_DIR / "README.md"
DOCS = PROJECT_DIR / "docs"
README_LIMIT = 15_000  # characters: the README is the front door, reference lives in docs/
PRODUCT = ("core", "remote", "infra", "awsapi")  # where error messages are written

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
# a code span: a run of backticks, then the same run again, within one paragraph
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\(\s*<?(?P<target>[^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CODE_POINTER = re.compile(r"docs/(?P<page>[A-Za-z0-9_./-]+?\.md)(?:#(?P<anchor>[A-Za-z0-9_-]*))?")


def markdown_files() -> list[Path]:
    return [p for p in (README, PROJECT_DIR / "CHANGELOG.md") if p.exists()] + sorted(DOCS.rglob("*.md"))


def _name(path: Path) -> str:
    """A path as the project names it (relative to the project directory, where it is inside)."""
    return path.relative_to(PROJECT_DIR).as_posix() if path.is_relative_to(PROJECT_DIR) else str(path)


def prose(text: str) -> str:
    """The text with fenced code blocks and code spans blanked out (line breaks kept, so offsets
    and line numbers stay those of the file)."""
    lines, fence = [], None
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            lines.append("")
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip(fence[0] + " \t"):
                fence = None
            lines.append("")
        else:
            lines.append(line)
    return _CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(lines))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before de-duplication)."""
    text = _LINK.sub(lambda m: m.group("text"), heading)  # a link in a heading counts by its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every anchor GitHub gives the headings of a Markdown file."""
    raw = path.read_text(encoding="utf-8").split("\n")
    seen: dict[str, int] = {}
    out = set()
    for number, line in enumerate(prose(path.read_text(encoding="utf-8")).split("\n")):
        if not _HEADING.match(line):
            continue
        m = _HEADING.match(raw[number])  # the heading as written, code spans included
        assert m is not None
        base = result = slug(m.group(2) or "")
        while result in seen:
            seen[base] += 1
            result = f"{base}-{seen[base]}"
        seen[result] = 0
        out.add(result)
    return frozenset(out)


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) for every link and image in a Markdown file, outside code."""
    text = prose(path.read_text(encoding="utf-8"))
    return [(text.count("\n", 0, m.start()) + 1, m.group("target")) for m in _LINK.finditer(text)]


def problem(source: Path, target: str) -> str | None:
    """What is wrong with a link from `source` to `target` (None: it resolves)."""
    if not target:
        return "empty link"
    if _SCHEME.match(target) or target.startswith("//"):
        return None  # not a file of this project
    path, _, anchor = target.partition("#")
    page = (source.parent / path).resolve() if path else source
    if not page.exists():
        return f"no such file {_name(page)}"
    if anchor and page.suffix == ".md" and anchor not in anchors(page):
        return f"no heading of {_name(page)} has the anchor #{anchor}"
    return None


@pytest.mark.parametrize("path", markdown_files(), ids=_name)
def test_every_link_resolves_to_a_file_and_a_heading(path):
    found = [f"{_name(path)}:{line}: ({target}): {why}"
             for line, target in links(path) if (why := problem(path, target))]
    assert not found, "broken links:\n" + "\n".join(found)


def test_the_readme_is_a_front_door_not_the_reference():
    size = len(README.read_text(encoding="utf-8"))
    assert size < README_LIMIT, f"README.md is {size} characters (under {README_LIMIT}): move reference into docs/"


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for _, target in links(README) if not _SCHEME.match(target) and target.partition("#")[0]}
    missing = [_name(p) for p in sorted(DOCS.rglob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links no {', '.join(missing)}: every docs page must be reachable from it"


def test_every_docs_anchor_in_product_code_names_a_heading():
    """Error messages say `see docs/troubleshooting.md#another-run-holds-the-lock`: the heading
    must exist, or the message points nowhere."""
    found = []
    for package in PRODUCT:
        for path in sorted((PROJECT_DIR / package).rglob("*")):
            if path.suffix not in (".py", ".sh") or "__pycache__" in path.parts:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
                for m in _CODE_POINTER.finditer(line):
                    page = DOCS / m.group("page")
                    where = f"{_name(path)}:{number}: ({m.group(0)})"
                    if not page.exists():
                        found.append(f"{where}: no such file docs/{m.group('page')}")
                    elif m.group("anchor") is not None and m.group("anchor") not in anchors(page):
                        found.append(f"{where}: no heading of docs/{m.group('page')} has the anchor "
                                     f"#{m.group('anchor')}")
    assert not found, "error messages point at headings that do not exist:\n" + "\n".join(found)


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Another run holds the lock", "another-run-holds-the-lock"),
    ("`fab status` verdicts", "fab-status-verdicts"),
    ("One environment, one record, one load balancer", "one-environment-one-record-one-load-balancer"),
    ("nginx -t rejected", "nginx--t-rejected"),
    ("The record is another environment's", "the-record-is-another-environments"),
    ("RESTORE FAILED", "restore-failed"),
    ("`ports.proxy_http` [link](x.md)", "portsproxy_http-link"),
])
def test_slugs_follow_github(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A\n\n## Notes\n\n```sh\n# Notes\n```\n\n## Notes\n\n## Notes-1\n")
    assert anchors(page) == {"a", "notes", "notes-1", "notes-1-1"}
