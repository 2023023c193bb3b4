"""Every citation of the project's documentation resolves: the file exists and so does the cited section.

A citation is a path under ``docs/`` ending in ``.md``, optionally followed by ``, section "<heading>"``;
it is looked for in the package, the notebooks (cell sources) and their grids, the tests, README and docs/.
README's Python example runs as printed.
"""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"(?P<path>docs/[\w./-]+?\.md)(?:,\s+section\s+\"(?P<section>[^\"]+)\")?")


def _sources() -> dict[str, str]:
    """Text of every file that may cite the docs, keyed by its path relative to the repository root."""
    files = [ROOT / "README.md"]
    folders = {"gnlib": ["*.py"], "tests": ["*.py"], "notebooks": ["*.ipynb", "*.yaml"], "docs": ["*.md"]}
    for folder, patterns in folders.items():
        for pattern in patterns:
            files += sorted((ROOT / folder).rglob(pattern))
    texts = {}
    for path in files:
        if path == ROOT / "docs" / "study.md":  # the cited page, which shows the citation form
            continue
        if path.suffix == ".ipynb":
            text = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)
        else:
            text = path.read_text(encoding="utf-8")
        texts[str(path.relative_to(ROOT))] = " ".join(text.split())  # citations may wrap across lines
    return texts


def _headings(path: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


CITATIONS = sorted(
    {(source, m["path"], m["section"]) for source, text in _sources().items() for m in CITATION.finditer(text)},
    key=lambda c: (c[0], c[1], c[2] or ""),
)


def test_the_study_facts_are_cited_from_code_notebooks_grids_and_tests():
    citing = {source for source, _, _ in CITATIONS}
    assert "README.md" in citing and sum(source.startswith("gnlib/") for source in citing) >= 2
    assert any(source.endswith(".ipynb") for source in citing) and any(source.endswith(".yaml") for source in citing)


@pytest.mark.parametrize("source, path, section", CITATIONS, ids=[f"{s}:{p}:{c}" for s, p, c in CITATIONS])
def test_citation_resolves(source, path, section):
    target = ROOT / path
    assert target.is_file(), f"{source} cites {path}, which does not exist"
    if section is not None:
        headings = _headings(target)
        assert section in headings, f"{source} cites {path}, section {section!r}; its sections: {sorted(headings)}"


def test_the_readme_python_example_runs():
    """The example under "## In Python" trains the tiny model with full GN as printed."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## In Python\n.*?^```python\n(.*?)^```", text, re.S | re.M)
    assert match, "README.md has no python code block under '## In Python'"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    history = namespace["history"]
    assert history.status == "completed" and history.rows[-1]["step"] == 20
    assert history.final_val_loss < history.rows[0]["val_loss"]
