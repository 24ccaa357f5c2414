"""The packages' import graph: no module imports back up or in a circle, and triton is imported
only by the modules that launch Triton kernels (a torch-only install must never need it)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mild", "mild_kernels")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module of the two packages that ``path`` imports, at top level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (base + ("." + node.module if node.module else "")) if node.level else node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from . import x` names module x
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = {t for t in imported(path) if t in modules and t != name}
        # a package's __init__ re-exports its modules; importing the package is not importing them back
        edges[name] = targets if path.name == "__init__.py" else {t for t in targets if not name.startswith(t + ".")}
    return edges


def test_no_module_imports_in_a_circle():
    edges = graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_the_mild_package_from_the_kernels():
    edges = graph()
    assert not [(a, b) for a, targets in edges.items() for b in targets
                if a.startswith("mild_kernels") and (b == "mild" or b.startswith("mild."))]


@pytest.mark.parametrize("module", ["mild_kernels.sma.configs", "mild_kernels.sma.layout", "mild_kernels.sma.op",
                                    "mild_kernels.sma.interface", "mild_kernels.multi_lora.op",
                                    "mild_kernels._backends"])
def test_triton_is_imported_only_where_a_triton_kernel_runs(module):
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in top_level if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert not {n for n in names if n == "triton" or n.startswith("triton.")}, module
