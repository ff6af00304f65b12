"""How fota's modules import each other, read from the source (module-level imports: those that
run when a module is imported; imports inside functions run only when used).

- no import cycle among fota's modules;
- `fota` commands do not import the device runner or SQLAlchemy to show their help.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in (SRC / "fota").rglob("*.py") if "migrations" not in p.parts}


def _imports(body, module: str, is_package: bool, *, nested: bool) -> list[str]:
    """Modules imported by these statements (fota submodules resolved); nested: also inside
    functions."""
    found: list[str] = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not nested:
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # for annotations only
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[:len(module.split(".")) - (0 if is_package else 1)]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            found += [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for field in ("body", "orelse", "finalbody", "handlers"):
            sub = getattr(node, field, None)
            if isinstance(sub, list):
                found += _imports(sub, module, is_package, nested=nested)
    return found


def _parse(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), str(MODULES[module]))


GRAPH = {m: _imports(_parse(m).body, m, p.name == "__init__.py", nested=False) for m, p in MODULES.items()}


def _edges(nested: bool) -> dict[str, set[str]]:
    """fota module -> the fota modules it imports (a package's __init__ imported by its submodules
    does not count: Python runs it first)."""
    graph = GRAPH if not nested else {
        m: _imports(_parse(m).body, m, p.name == "__init__.py", nested=True) for m, p in MODULES.items()}
    return {m: {i for i in graph[m] if i in MODULES and not m.startswith(i + ".")} for m in MODULES}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)
    for m in sorted(edges):
        if m not in index:
            connect(m)
    cycles = []
    for group in groups:
        start = min(group)
        paths = {start: [start]}
        todo = [start]
        while todo:  # breadth first inside the group, back to start
            v = todo.pop(0)
            for w in sorted(edges[v] & group):
                if w == start:
                    cycles.append(paths[v] + [start])
                    todo = []
                    break
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    todo.append(w)
    return cycles


# Cycles through imports inside functions that this check tolerates, and why.
TOLERATED_LAZY_CYCLES = [
    # fsutil's power-cut points raise the simulated flash's PowerCut (device code, tests only).
    {"fota.device.fsutil", "fota.device.slots.sim"},
]


def test_no_import_cycle_among_fota_modules():
    cycles = _cycles(_edges(nested=False))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_even_through_imports_in_functions():
    """Modules that import each other only inside functions still depend on each other (cli.py
    and demo.py did)."""
    cycles = [c for c in _cycles(_edges(nested=True)) if set(c) not in TOLERATED_LAZY_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    edges = _edges(nested=False)
    edges["fota.cli_common"] = edges["fota.cli_common"] | {"fota.cli"}
    assert _cycles(edges) == [["fota.campaign_cli", "fota.cli_common", "fota.cli", "fota.campaign_cli"]]


def test_the_help_imports_neither_the_device_runner_nor_sqlalchemy():
    code = ("import sys; sys.argv = ['fota', '--help']; from fota.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('fota.device.runner', 'sqlalchemy', "
            "'fota.tools.supervisor', 'asyncio'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-500:]
