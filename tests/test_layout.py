"""The package's architecture, checked on its imports (every import, also those inside functions).

- No import cycle between modules.
- ``pipeline.hessian`` (the math) imports nothing of ours outside itself.
- ``pipeline.config`` imports no execution, storage or reading code; ``pipeline.store`` no
  execution or reading code.
- Backend names are compared only inside ``pipeline.execution.backends`` (the registry).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pipeline"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The modules of ours that ``name`` imports anywhere in its file."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        # (a package's own __init__ runs before its modules: not an edge)
        found |= {c for c in candidates if c in MODULES and not _within(name, c)}
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


GRAPH = {name: _imports(name) for name in MODULES}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# package -> packages of ours it must not import
FORBIDDEN = {
    "pipeline.hessian": ("pipeline.config", "pipeline.execution", "pipeline.inputs",
                         "pipeline.store", "pipeline.results", "pipeline.errors"),
    "pipeline.config": ("pipeline.execution", "pipeline.store", "pipeline.results",
                        "pipeline.inputs"),
    "pipeline.store": ("pipeline.execution", "pipeline.results"),
    "pipeline.inputs": ("pipeline.execution", "pipeline.store", "pipeline.results"),
}  # fmt: skip


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_layers(package):
    bad = sorted(
        f"{m} imports {n}"
        for m, deps in GRAPH.items()
        if m == package or m.startswith(package + ".")
        for n in deps
        if any(n == f or n.startswith(f + ".") for f in FORBIDDEN[package])
    )
    assert not bad, "\n".join(bad)


def test_backend_names_are_compared_only_in_the_registry():
    names = "|".join(("local", "dask", "dask_cuda", "address"))
    pattern = re.compile(
        rf"""[=!]=\s*["']({names})["']|["']({names})["']\s*[=!]=|in \([^)]*["']({names})["']"""
    )
    found = [
        f"{path.relative_to(ROOT.parent)}:{i}: {line.strip()}"
        for name, path in MODULES.items()
        if not name.startswith("pipeline.execution.backends")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)


def test_every_backend_option_has_a_registered_backend():
    from pipeline.config.schema import OPTIONS
    from pipeline.execution.backends import BACKENDS

    assert set(BACKENDS) == set(OPTIONS["backend"])
