"""The package's layers: what may import what (docs/architecture.md draws the same list).

Every `acteng` module belongs to one layer; it may import modules of its own layer or of
earlier ones, never a later layer, and the import graph has no cycle. Imports inside
functions and under TYPE_CHECKING count too: a lazy import still couples the two modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "acteng"

# Earlier layers first. A name covers the module and, for a package, all its modules.
LAYERS: list[tuple[str, ...]] = [
    ("acteng.errors",),
    ("acteng.layouts", "acteng.home", "acteng.model_files", "acteng.positions", "acteng.pairs",
     "acteng.methods", "acteng.batching", "acteng.hooks", "acteng.bundled",
     "acteng.layer_selection", "acteng.names"),
    ("acteng.models", "acteng.vectors", "acteng.held_out"),
    ("acteng.backends", "acteng.activations", "acteng.steering", "acteng.library",
     "acteng.gguf_vectors", "acteng.pooling"),
    ("acteng.extraction", "acteng.optimization", "acteng.baking", "acteng.generation",
     "acteng.detectors", "acteng.token_detector", "acteng.joint_calibration"),
    ("acteng.monitoring", "acteng.guard_policy", "acteng.guard", "acteng.adversarial",
     "acteng.evaluation",
     "acteng.detector_training", "acteng.training"),
    ("acteng.report", "acteng.recipes"),
    ("acteng.server",),
    ("acteng.vllm_engine",),
    ("acteng.cli",),
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def imports_of(path: Path) -> set[str]:
    """acteng modules that `path` imports (the root package itself excepted: it only
    re-exports lazily and holds __version__)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from acteng.steering import compiled` names a module too
            found.update(f"{node.module}.{a.name}" for a in node.names)
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    return {m for m in found if m in modules and m != "acteng"}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    for module in graph():
        if module != "acteng":
            layer_of(module)


def test_no_upward_import() -> None:
    bad = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph().items()
        if module != "acteng"
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    edges = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of design: drop the
    # edges from a module to the package that contains it.
    for module, targets in edges.items():
        edges[module] = {t for t in targets if t != module and not module.startswith(t + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("limit", [400])
def test_no_module_over_limit(limit: int) -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit
    }
    assert not long, f"modules over {limit} lines (split them): {long}"
