"""The documentation holds together: README.md is a product page of at most 200 lines, every relative link in
README.md and docs/ reaches a file (and a heading, for a #anchor), and nothing in the repository sends a reader
to a document outside it (the method and protocol pages are docs/method.md and docs/protocol.md)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose(page: Path) -> str:
    """The page without fenced code blocks and inline code (links there are not links)."""
    out, fenced = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def anchors(page: Path) -> set[str]:
    """The #anchors of a page's headings (GitHub's rule: lower case, punctuation dropped, spaces to dashes)."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.*)$", prose(page), flags=re.M)}


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, fragment = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{page.relative_to(ROOT)}: {target} does not exist")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{page.relative_to(ROOT)}: {target} names no heading of {dest.relative_to(ROOT)}")
    return bad


def test_readme_is_a_product_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_link_reaches_a_file_and_heading():
    assert len(pages()) > 10
    bad = [b for page in pages() for b in broken_links(page)]
    assert not bad, "\n".join(bad)


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A heading\n")
    page.write_text("[ok](other.md#a-heading) [gone](missing.md) [no](other.md#nothing) `[code](x.md)`\n"
                    "```\n[fenced](y.md)\n```\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert broken_links(page) == ["page.md: missing.md does not exist",
                                      "page.md: other.md#nothing names no heading of other.md"]
    finally:
        ROOT = saved


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = [f for f in tracked if not f.startswith("tests/data/") and (ROOT / f).is_file()
               and f != "tests/test_docs.py" and "shared/docs" in (ROOT / f).read_text(errors="ignore")]
    assert not outside, f"these files cite ../shared/docs, which a clone does not have: {outside}"
