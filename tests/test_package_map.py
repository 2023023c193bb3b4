"""The package map in docs/architecture.md names every module of gnlib with its job, and no module that is missing."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "architecture.md"


def package_map() -> dict[str, str]:
    """Module path relative to ``gnlib/`` (``"optim/muon.py"``) -> the job its line of the map gives it.

    The map is the code block under "## The package": modules at an indent of 2, a folder's modules at 4
    under its ``name/`` line, deeper lines continue the previous description.
    """
    text = MAP.read_text(encoding="utf-8")
    match = re.search(r"^## The package\n.*?^```\ngnlib/\n(.*?)^```", text, re.S | re.M)
    assert match, "docs/architecture.md has no code block starting with 'gnlib/' under '## The package'"
    entries: dict[str, str] = {}
    folder, last = "", None
    for line in match.group(1).splitlines():
        indent = len(line) - len(line.lstrip(" "))
        name, _, description = line.strip().partition(" ")
        if indent == 2 and name.endswith("/"):
            folder, last = name, None
        elif indent in (2, 4) and name.endswith(".py"):
            folder = folder if indent == 4 else ""
            last = folder + name
            assert last not in entries, f"{last} appears twice in the package map"
            entries[last] = description.strip()
        else:
            assert last is not None and indent > 4, f"unexpected line in the package map: {line!r}"
            entries[last] += " " + line.strip()
    return entries


def test_package_map_lists_every_module_and_only_existing_ones():
    mapped = package_map()
    modules = {p.relative_to(ROOT / "gnlib").as_posix() for p in (ROOT / "gnlib").rglob("*.py")}
    assert sorted(modules - set(mapped)) == [], "modules missing from the package map"
    assert sorted(set(mapped) - modules) == [], "the package map names modules that do not exist"
    terse = {module: job for module, job in mapped.items() if len(job.split()) < 4}
    assert terse == {}, "every module's line says its job in a few words"
