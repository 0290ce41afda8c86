"""The layout shows the design: imports flow one way, and the worker side stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.procs import ROOT

PACKAGES = ("workers", "dispatch", "brokersite")


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Project modules imported at module level (not inside functions, not for typing)."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_of(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if "migrations" not in p.parts}
    return {name: {m for m in top_level_imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycles() -> None:
    edges = graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges[node]):
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(
                    path[path.index(nxt):] + [nxt]))
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for node in sorted(edges):
        if node not in seen:
            visit(node, [node])


def test_the_worker_side_imports_nothing_of_the_broker() -> None:
    for name, imports in graph().items():
        if name.startswith("workers"):
            assert not {i for i in imports if not i.startswith("workers")}, (name, imports)
    for path in (ROOT / "workers").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import django" not in text and "from django" not in text, path


#: The broker's layers, from the top down: a module imports from its own layer and those
#: below it, never from one above. Modules in no layer are leaves (settings, errors,
#: models, history, auth, the pure balancing rules, loop helpers): any layer may use
#: them, and they use no layer.
LAYERS = [
    ("dispatch.management", "dispatch.admin", "dispatch.server", "brokersite"),
    ("dispatch.transport",),
    ("dispatch.control", "dispatch.fleet", "dispatch.tasks", "dispatch.replay"),
    ("dispatch.core",),
    ("dispatch.registry",),
    ("dispatch.redis",),
]


def layer_of(module: str) -> int | None:
    for depth, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return depth
    return None


def test_imports_flow_down_the_layers() -> None:
    """transport -> control -> core -> registry -> redis, never back; leaves use none."""
    wrong = []
    for name, imports in graph().items():
        if not name.startswith("dispatch"):
            continue
        here = layer_of(name)
        for imported in imports:
            there = layer_of(imported)
            if there is not None and (here is None or there < here):
                wrong.append(f"{name} -> {imported}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_class_is_over_300_lines() -> None:
    """A class that grows past this has taken on a second job: split it along its seam."""
    long = []
    for pkg in ("dispatch", "workers"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 300:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} "
                                f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_the_core_knows_no_sockets() -> None:
    """The request table and the routing core import no transport (sockets)."""
    for name, imports in graph().items():
        if name.startswith(("dispatch.core", "dispatch.registry")):
            assert not {i for i in imports if i.startswith("dispatch.transport")}, name
