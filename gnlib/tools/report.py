"""The documentation's results tables, regenerated from a sweep of notebook 02, never typed by hand.

Usage::

    python -m gnlib.tools.report outputs/cpu_study --figures outputs/cpu_study/summary [--page docs/results.md ...]

copies the sweep's ``results.csv`` and ``sweep.json`` to ``notebooks/results/<sweep name>/`` (small files,
kept in git), the summary's figures to ``notebooks/figures/<sweep name>_<figure>.png``, and rewrites, in
every page given (default: README.md and docs/*.md), each block between ``<!-- results: <sweep name> -->``
and ``<!-- /results -->`` with :func:`results_markdown` of the copied table, and each block opened by
``<!-- results: <sweep name> headline -->`` with its steps and ratio tables only. ``tests/tools/test_report.py``
regenerates every such block from the committed tables and fails when a page differs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from gnlib.runtime import atomic_write_text
from gnlib.tools.results_tables import DIRECTIONS_FILE, results_markdown

RESULTS_DIR, FIGURES_DIR = Path("notebooks/results"), Path("notebooks/figures")
#: The pages whose blocks are regenerated when none is given: README and every page under docs/.
PAGES = (Path("README.md"), Path("docs"))
#: A generated block: ``<!-- results: NAME -->`` (every table), ``<!-- results: NAME headline -->`` (steps and
#: ratios) or ``<!-- results: NAME largest -->`` (one table at the largest batch), its body, ``<!-- /results -->``.
_BLOCK = (
    r"(?P<open><!-- results: (?P<label>(?P<name>{name})(?: (?P<part>headline|largest|shares))?) -->\n)"
    r"(?P<body>.*?)(?P<close><!-- /results -->)"
)


def default_pages() -> list[Path]:
    """The pages searched for blocks when none is given: README.md and docs/*.md (relative to the working folder)."""
    readme, docs = PAGES
    return [readme, *sorted(docs.glob("*.md"))]


def page_blocks(page: str | Path) -> dict[str, str]:
    """A page's results blocks: the marker's label (``"cpu_study"``, ``"cpu_study headline"``) → its text."""
    text = Path(page).read_text(encoding="utf-8")
    return {m["label"]: m["body"] for m in re.finditer(_BLOCK.format(name=r"[\w.-]+"), text, re.DOTALL)}


def block_markdown(results_csv: str | Path, label: str, directions: str | Path | None = None) -> str:
    """The text of a block labelled ``label``: ``NAME``, or ``NAME`` and a part: headline, largest or shares."""
    part = label.partition(" ")[2]
    return results_markdown(
        results_csv,
        headline=part == "headline",
        largest=part == "largest",
        shares=part == "shares",
        directions=directions,
    )


def update_pages(
    pages: list[str | Path], name: str, results_csv: str | Path, directions: str | Path | None = None
) -> list[Path]:
    """Regenerate every block of sweep ``name`` in ``pages`` from ``results_csv``; each page written atomically.

    Returns:
        The pages that hold a block of ``name``.

    Raises:
        ValueError: a page does not exist, or none holds a block of ``name`` (naming the markers to add);
            nothing is written then.
    """
    pattern = re.compile(_BLOCK.format(name=re.escape(name)), re.DOTALL)
    absent = [str(page) for page in pages if not Path(page).is_file()]
    if absent:
        raise ValueError(f"page {', '.join(absent)} does not exist: give a page that holds a block of {name!r}")
    texts = {Path(page): Path(page).read_text(encoding="utf-8") for page in pages}
    holding = {page: text for page, text in texts.items() if pattern.search(text)}
    if not holding:
        raise ValueError(
            f"{', '.join(map(str, texts)) or 'no page'} has no block for {name!r}: add the lines "
            f"'<!-- results: {name} -->' (or '<!-- results: {name} headline -->') and '<!-- /results -->' "
            "where its tables go"
        )
    labels = {m["label"] for text in holding.values() for m in pattern.finditer(text)}
    markdown = {
        label: block_markdown(results_csv, label, directions) for label in sorted(labels)
    }  # before any page is written
    for page, text in holding.items():
        atomic_write_text(page, pattern.sub(lambda m: m["open"] + markdown[m["label"]] + m["close"], text))
    return list(holding)


def publish(sweep_dir: str | Path, figures: str | Path | None = None, pages: list[str | Path] | None = None) -> Path:
    """Copy a sweep's tables (and figures) into the repository and regenerate its blocks in ``pages``.

    Args:
        sweep_dir: a sweep folder of notebook 02 (``results.csv``, ``sweep.json``).
        figures: folder of the summary's PNG figures, copied to ``notebooks/figures/`` (and its
            ``directions_vs_steps.csv``, if any, to the tables).
        pages: the pages whose blocks of this sweep to regenerate (default :func:`default_pages`).

    Returns:
        The folder the tables were copied to, ``notebooks/results/<sweep name>``.

    Raises:
        ValueError: ``sweep_dir`` lacks results.csv or sweep.json, its results.csv is cut short or damaged,
            or no page holds a block of the sweep; nothing is written then.
    """
    sweep_dir = Path(sweep_dir)
    missing = [f for f in ("results.csv", "sweep.json") if not (sweep_dir / f).is_file()]
    if missing:
        raise ValueError(f"sweep_dir={str(sweep_dir)!r} lacks {missing}: run `python -m gnlib.tools.sweep GRID` first")
    name = sweep_dir.name
    directions = Path(figures) / DIRECTIONS_FILE if figures and (Path(figures) / DIRECTIONS_FILE).is_file() else None
    update_pages(default_pages() if pages is None else pages, name, sweep_dir / "results.csv", directions)
    target = RESULTS_DIR / name
    target.mkdir(parents=True, exist_ok=True)
    if target.resolve() != sweep_dir.resolve():  # republishing the committed tables copies nothing
        for file in ("results.csv", "sweep.json"):
            shutil.copyfile(sweep_dir / file, target / file)
    if directions is not None:
        shutil.copyfile(directions, target / DIRECTIONS_FILE)
    for png in sorted(Path(figures).glob("*.png")) if figures else []:
        shutil.copyfile(png, FIGURES_DIR / f"{name}_{png.name}")
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (0 done, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m gnlib.tools.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a sweep folder of notebook 02 (results.csv, sweep.json)")
    parser.add_argument("--figures", help="folder of the summary's PNG figures (notebook 02's output_dir)")
    parser.add_argument(
        "--page",
        dest="pages",
        action="append",
        help="a page whose blocks of this sweep to regenerate; repeatable (default README.md and docs/*.md)",
    )
    args = parser.parse_args(argv)
    pages = default_pages() if args.pages is None else [Path(page) for page in args.pages]
    name = Path(args.sweep_dir).name
    try:
        target = publish(args.sweep_dir, args.figures, pages)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    held = [str(page) for page in pages if any(label.split()[0] == name for label in page_blocks(page))]
    print(f"tables in {target}; blocks of {name!r} regenerated in {', '.join(held)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
