"""gnlib's packages import downward only, and no module imports itself back: a layer table checked with ast."""

import ast
from pathlib import Path

import pytest

GNLIB = Path(__file__).resolve().parents[1] / "gnlib"

#: The layers, lowest first: a module may import from its own layer and the ones above it in this list.
LAYERS = [
    {"runtime", "checks", "params", "losses", "distributed", "host_reads"},
    {"models"},
    {"curvature"},
    {"optim"},
    {"data"},
    {"experiment"},
    {"notebook"},
    {"tools"},
]


def layer(module: str) -> int:
    """The layer of ``gnlib.<part>...`` (the public API ``gnlib`` itself sits above every layer)."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    found = [i for i, names in enumerate(LAYERS) if parts[1] in names]
    assert found, f"{module} is in no layer of tests/test_layers.py: add its package to LAYERS"
    return found[0]


def module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imports(source: str) -> list[tuple[str, int]]:
    """(imported gnlib module, line) of every import in ``source``, at any depth (function-local ones too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("gnlib")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gnlib"):
            if node.module == "gnlib":  # ``from gnlib import models``: the named subpackages
                found += [(f"gnlib.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


def graph(root: Path = GNLIB) -> dict[str, list[tuple[str, int]]]:
    """Module -> the gnlib modules it imports (with lines), for every module under ``root``."""
    return {module_name(path, root): imports(path.read_text(encoding="utf-8")) for path in sorted(root.rglob("*.py"))}


def upward(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    """The imports that reach a higher layer than their module's."""
    return [
        f"{source}:{line} imports {target} (layer {layer(target)} above {layer(source)})"
        for source, targets in edges.items()
        for target, line in targets
        if source != "gnlib" and layer(target) > layer(source)
    ]


def cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Import cycles between modules (a package's ``__init__`` importing its own modules is not one)."""
    known = set(edges)

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    succ = {s: {resolve(t) for t, _ in ts} - {None, s} for s, ts in edges.items()}
    succ = {s: {t for t in ts if not s.startswith(t + ".") and not t.startswith(s + ".")} for s, ts in succ.items()}
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(succ[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(succ):
        if start not in state:
            visit(start, [start])
    return found


def test_every_import_runs_down_the_layers():
    assert upward(graph()) == []


def test_no_module_imports_itself_back():
    assert cycles(graph()) == []


@pytest.mark.parametrize(
    ("planted", "finds"),
    [
        ("from gnlib.experiment.runs import RunSpec\n", upward),  # models importing the experiment layer
        ("from gnlib.models.transformer import Transformer\n", cycles),  # config <-> transformer
    ],
)
def test_a_planted_upward_import_or_cycle_is_found(tmp_path, planted, finds):
    tree = tmp_path / "gnlib"
    for path in GNLIB.rglob("*.py"):
        copy = tree / path.relative_to(GNLIB)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    config = tree / "models" / "config.py"
    config.write_text(config.read_text(encoding="utf-8") + "\n" + planted, encoding="utf-8")
    assert finds(graph(tree)) != [] and finds(graph(GNLIB)) == []
