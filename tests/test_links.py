"""Every relative link in README.md and docs/*.md points to an existing file, and to one of its headings if named.

Links are markdown's ``[text](target)`` and ``![alt](target)`` outside code; a target with a scheme (``https:``) is
not followed. Anchors are the heading slugs GitHub makes: lower case, punctuation dropped, spaces as hyphens.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: ``"The study's model and data"`` -> ``"the-studys-model-and-data"``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings (a repeated heading's second anchor ends in ``-1``, ...)."""
    found: set[str] = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if re.match(r"#{1,6} ", line):
            base, n = slug(line.lstrip("#")), 0
            while (f"{base}-{n}" if n else base) in found:
                n += 1
            found.add(f"{base}-{n}" if n else base)
    return found


def links(page: Path) -> list[str]:
    """The link targets of a page, outside code blocks and inline code."""
    text = CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return [m["target"] for m in LINK.finditer(text)]


LINKS = [
    (page.relative_to(ROOT).as_posix(), target)
    for page in PAGES
    for target in links(page)
    if not re.match(r"[a-z][a-z0-9+.-]*:", target)
]


def test_the_front_page_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for page, target in LINKS if page == "README.md"}
    assert set(PAGES[1:]) <= linked, "README.md should link every page under docs/"


def test_the_slug_is_githubs():
    assert slug("The study's model and data") == "the-studys-model-and-data"
    assert slug("Where the time of an inner step goes") == "where-the-time-of-an-inner-step-goes"
    assert slug("GN-prox-linear and `blocks`") == "gn-prox-linear-and-blocks"


@pytest.mark.parametrize("page, target", LINKS, ids=[f"{p}->{t}" for p, t in LINKS])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.exists(), f"{page} links {target}, but {file.relative_to(ROOT)} does not exist"
    assert file.resolve().is_relative_to(ROOT), f"{page} links {target}, outside the repository"
    if anchor:
        assert file.suffix == ".md", f"{page} links {target}: an anchor into a file that is not markdown"
        assert anchor in anchors(file), f"{page} links {target}: no such heading; its anchors: {sorted(anchors(file))}"
