"""The house's layers: the import graph of saat_dist (every import, at module
level or inside a function) has no circle, no module imports from a layer
above its own, and no module imports another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "saat_dist"

# Low to high: a module may import its own layer and the ones below. A
# package name stands for its modules (the longest name that fits wins); the
# package root stands for itself only.
LAYERS = [
    ["saat_dist", "saat_dist.keyed_random", "saat_dist.device", "saat_dist.progress", "saat_dist.console",
     "saat_dist.config_fields", "saat_dist.checkpoint", "saat_dist.certify_settings", "saat_dist.optimizers"],
    ["saat_dist.metrics", "saat_dist.hashing", "saat_dist.mainstay", "saat_dist.comm", "saat_dist.data"],
    ["saat_dist.models"],
    ["saat_dist.attacks"],
    ["saat_dist.training.steps", "saat_dist.training.optim", "saat_dist.training.encode",
     "saat_dist.training.checkpointing"],
    ["saat_dist.defences"],
    ["saat_dist.config", "saat_dist.stages"],
    ["saat_dist.training", "saat_dist.monitoring"],
    ["saat_dist.evaluation", "saat_dist.cost_model"],
    ["saat_dist.runner"],
    ["saat_dist.distributed"],
    ["saat_dist.pipeline", "saat_dist.experiment", "saat_dist.certification"],
    ["saat_dist.cli", "saat_dist.bench"],
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported saat_dist module, names) for every import in the file."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("saat_dist")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saat_dist"):
            out.append((node.module, [a.name for a in node.names]))
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {m: set() for m in modules}
    for m, path in modules.items():
        for target, names in imports(path):
            # ``from saat_dist.attacks import hag`` names a module; otherwise the package or module itself
            for name in names or [None]:
                sub = f"{target}.{name}" if name else None
                dest = sub if sub in modules else target
                if dest in modules and dest != m:
                    edges[m].add(dest)
    return edges


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            fits = module == prefix or (prefix != "saat_dist" and module.startswith(prefix + "."))
            if fits and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} is in no layer"
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_no_circle_in_the_import_graph():
    assert cycles(graph()) == []


def test_no_module_imports_from_a_layer_above_its_own():
    up = [(m, n) for m, targets in graph().items() for n in targets if layer_of(n) > layer_of(m)]
    assert up == []


def test_no_module_imports_another_modules_private_names():
    private = [(module_name(p), target, name) for p in PACKAGE.rglob("*.py") for target, names in imports(p)
               for name in names if name.startswith("_") and not name.startswith("__")]  # __version__ is public
    assert private == []
