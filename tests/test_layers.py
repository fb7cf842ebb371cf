"""The package's layers, read from the source: who may import whom, no cycles, imports at the top.

Rules (docs/architecture.md):
- core/ imports only core/; models/ and data/ import core/ (and models/ <-> data/ not at all);
- compress/ imports only core/ (and itself): what is task-specific reaches it through the target;
- tad/ imports core/, models/, data/;
- recipes/ may import everything but the CLI; nothing imports blockdrop.cli (but __main__);
- no import cycles between modules; package-internal imports sit at module top.

The checker is tested on a planted bad tree too, so a rule that silently stopped matching fails.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "blockdrop"
ALLOWED = {  # layer -> the layers it may import
    "core": {"core"},
    "models": {"core", "models"},
    "data": {"core", "data"},
    "compress": {"core", "compress"},
    "tad": {"core", "models", "data", "tad"},
    "recipes": {"core", "models", "data", "tad", "compress", "recipes"},
    "cli": {"core", "recipes"},
    "__main__": {"cli"},
    "__init__": set(),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(["blockdrop", *parts])


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, root: Path) -> list[tuple[str, bool]]:
    """(imported blockdrop module, at module top) for every import of the package in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root)
    found = []
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = here if path.name == "__init__.py" else here.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                prefix = ".".join(p for p in (package, node.module) if p)
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        for name in names:
            if name == "blockdrop" or name.startswith("blockdrop."):
                found.append((name, id(node) in top))
    return found


def known_modules(root: Path) -> set[str]:
    return {module_name(p, root) for p in root.rglob("*.py")}


def resolve(name: str, modules: set[str]) -> str | None:
    """The module an imported name lives in (``blockdrop.compress.stack.drop_blocks`` -> ``...stack``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def violations(root: Path) -> list[str]:
    modules = known_modules(root)
    problems, graph = [], {m: set() for m in modules}
    for path in sorted(root.rglob("*.py")):
        here = module_name(path, root)
        for name, at_top in imports(path, root):
            target = resolve(name, modules)
            if target is None or target == here:
                continue
            if target == "blockdrop" and path.name == "__init__.py":
                continue
            graph[here].add(target)
            if not at_top:
                problems.append(f"{here}: imports {target} inside a function (put it at the top)")
            if target == "blockdrop.cli" and here != "blockdrop.__main__":
                problems.append(f"{here}: imports the CLI")
            allowed = ALLOWED.get(layer_of(here), set())
            if layer_of(target) not in allowed and target != "blockdrop":
                problems.append(f"{here}: the {layer_of(here)} layer imports {target}")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_keeps_its_layers():
    assert violations(SRC) == []


def test_at_most_four_flat_modules_beside_the_cli():
    flat = sorted(p.name for p in SRC.glob("*.py") if p.name != "cli.py")
    assert len(flat) <= 4, flat


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "blockdrop" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "blockdrop"


@pytest.mark.parametrize("files,expected", [
    ({"compress/__init__.py": "", "compress/a.py": "from blockdrop.tad.target import X\n",
      "tad/__init__.py": "", "tad/target.py": "X = 1\n"}, "the compress layer imports blockdrop.tad.target"),
    ({"compress/__init__.py": "", "compress/a.py": "import blockdrop.models.vit\n",
      "models/__init__.py": "", "models/vit.py": ""}, "the compress layer imports blockdrop.models.vit"),
    ({"core/__init__.py": "", "core/a.py": "from blockdrop.core import b\n",
      "core/b.py": "from blockdrop.core.a import x\nx = 1\n"}, "import cycle: blockdrop.core.a -> blockdrop.core.b"),
    ({"recipes/__init__.py": "", "recipes/a.py": "def f():\n    from blockdrop.recipes import b\n",
      "recipes/b.py": ""}, "imports blockdrop.recipes.b inside a function"),
    ({"recipes/__init__.py": "", "recipes/a.py": "from blockdrop.cli import main\n",
      "cli.py": ""}, "blockdrop.recipes.a: imports the CLI"),
])
def test_the_checker_finds_a_planted_violation(tmp_path, files, expected):
    root = _plant(tmp_path, {"__init__.py": "", **files})
    assert any(expected in problem for problem in violations(root)), violations(root)
