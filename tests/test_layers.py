"""Dependencies point one way, down the layers of docs/architecture.md: a module that
imports from a higher layer (anywhere in the file, inside functions too) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"

# Low to high. A part (a top-level module or package of wmlab) may import its own layer and
# the layers below, never above. Keep in step with docs/architecture.md.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "closing", "version", "machine", "native", "procs", "plots", "metrics", "published",
     "config", "device", "fsio", "checkpoint", "runs", "raycluster", "evaluators"),
    ("envs", "policies", "data"),
    ("vision", "memory", "controller"),
    ("shipped",),
    ("dream",),
    ("agent",),
    ("collect", "evaluate", "fidelity", "stall", "baselines", "calibrate", "bench"),
    ("report",),
    ("pipeline", "play", "sweep", "pretrained"),
    ("cli", "__main__", "wmlab"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "wmlab").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _part(module: str) -> str:
    """The top-level part of wmlab a module belongs to (``wmlab`` for the package itself)."""
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "wmlab"


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The wmlab modules a file imports, anywhere in it (``from wmlab import x`` names the
    submodule x where there is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("wmlab")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "wmlab":
                out |= {f"wmlab.{a.name}" if f"wmlab.{a.name}" in modules else "wmlab"
                        for a in node.names}
            elif node.module.startswith("wmlab."):
                out.add(node.module)
    return out


def _edges() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        for target in _imports(path, modules):
            if _part(target) != _part(name):
                edges.setdefault(name, set()).add(_part(target))
    return edges


def test_every_part_has_a_layer():
    parts = {_part(name) for name in _modules()}
    placed = [part for layer in LAYERS for part in layer]
    assert len(placed) == len(set(placed)), "a part is in two layers"
    assert parts == set(placed), (f"not placed: {sorted(parts - set(placed))}; "
                                  f"gone: {sorted(set(placed) - parts)}")


def test_no_module_imports_upward():
    layer = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    upward = sorted(f"{module} imports {target}"
                    for module, targets in _edges().items() for target in targets
                    if layer[target] > layer[_part(module)])
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for module, targets in _edges().items():
        graph.setdefault(_part(module), set()).update(targets)
    done: set[str] = set()

    def visit(part: str, path: tuple[str, ...]) -> None:
        assert part not in path, "import cycle: " + " -> ".join((*path, part))
        if part in done:
            return
        for target in sorted(graph.get(part, ())):
            visit(target, (*path, part))
        done.add(part)

    for part in sorted(graph):
        visit(part, ())


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk counts imports inside functions (where cycles used to hide)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from wmlab.pipeline import Pipeline\n")
    assert _imports(source, _modules()) == {"wmlab.pipeline"}
