"""How fota's modules import each other and their dependencies, read from the source (module-level
imports: those that run when a module is imported; imports inside functions run only when used).

- no import cycle among fota's modules;
- `fota` commands do not import the device runner or SQLAlchemy to show their help;
- every third-party module the code imports comes from the core dependencies or an extra
  (pyproject.toml), the extras' modules are named in fota.extras (for the one-line error), and
  what the commands of the core install import at module level needs only the core.
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from fota.extras import EXTRA_OF_MODULE

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Board and MicroPython modules (the device code imports them where they exist: try/except), and
# the application the agent runs (app).
DEVICE_SIDE = {"app", "machine", "esp32", "network", "micropython", "cryptolib", "deflate", "uctypes",
               "utime", "ussl", "usocket", "uhashlib", "ubinascii", "ujson", "uos", "uselect", "uerrno",
               "ustruct", "uzlib", "ucryptolib", "tls", "uasyncio", "rp2"}

# The commands (functions of the CLI modules) that need an extra, and which.
COMMAND_EXTRAS = {"api": {"server"}, "serve": {"server"}, "worker": {"server"}, "simulate": {"server"},
                  "demo": {"server", "device"}, "device_run": {"device"}}
CLI_MODULES = ("fota.cli", "fota.campaign_cli", "fota.cli_common", "fota.deployment_view")


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


def _closure(starts) -> set[str]:
    """Every module importing `starts` imports (module level), their packages included."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for k in range(1, len(parts) + 1):
            name = ".".join(parts[:k])
            if name not in seen:
                seen.add(name)
                todo += GRAPH.get(name, [])
    return seen


def _third_party(modules) -> set[str]:
    tops = {m.split(".")[0] for m in modules}
    return {t for t in tops if t != "fota" and t not in sys.stdlib_module_names and t not in DEVICE_SIDE}


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


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs) -> set[str]:
    return {_normalize(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in reqs}


def _with_dependencies(names: set[str]) -> set[str]:
    """These distributions and, installed, what they require (fastapi brings starlette)."""
    out, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += _requirement_names(r for r in requires if "extra ==" not in r and not r.startswith("fota"))
    return out


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE_DIRECT = _requirement_names(PROJECT["dependencies"])
CORE = _with_dependencies(CORE_DIRECT)
EXTRAS = {extra: _requirement_names(r for r in reqs if not r.startswith("fota["))
          for extra, reqs in PROJECT["optional-dependencies"].items()}
WITH_EXTRA = {extra: _with_dependencies(names) for extra, names in EXTRAS.items()}
DISTRIBUTIONS = {module: {_normalize(d) for d in dists}
                 for module, dists in importlib.metadata.packages_distributions().items()}


def _needs(modules) -> set[str]:
    """The distributions that provide these third-party modules."""
    needs = set()
    for module in modules:
        assert module in DISTRIBUTIONS, f"{module} is imported but no installed distribution provides it"
        needs |= DISTRIBUTIONS[module]
    return needs


def _extras_of(distributions) -> set[str]:
    return {extra for d in distributions - CORE for extra, names in EXTRAS.items()
            if d in names and extra != "test"}


def test_every_imported_module_comes_from_the_core_or_an_extra_named_in_fota_extras():
    everywhere = set()
    for m in MODULES:
        tree = _parse(m)
        everywhere |= _third_party(_imports(tree.body, m, MODULES[m].name == "__init__.py", nested=True))
    for module in sorted(everywhere):
        dists = DISTRIBUTIONS.get(module, set())
        assert dists & CORE or module in EXTRA_OF_MODULE, \
            f"{module} ({dists}) is neither a core dependency nor in fota.extras.EXTRA_OF_MODULE"
    for module, extra in EXTRA_OF_MODULE.items():
        if module in DISTRIBUTIONS:  # multipart or python_multipart, depending on the version
            assert DISTRIBUTIONS[module] & WITH_EXTRA[extra], \
                f"fota.extras says {module} comes with fota[{extra}]; pyproject.toml does not list it there"
            assert not DISTRIBUTIONS[module] & CORE, f"{module} is a core dependency, not fota[{extra}]"
    pulled = set(re.findall(r"fota\[([^]]*)\]", " ".join(PROJECT["optional-dependencies"]["test"])))
    assert {e for group in pulled for e in group.split(",")} >= {"server", "postgres", "device"}, \
        "./run test, demo and bench install fota[test]: it must pull every extra"


def _command_imports() -> dict[str, list[str]]:
    """Per function of the CLI modules: the modules it imports when it runs."""
    out = {}
    for m in CLI_MODULES:
        for node in ast.walk(_parse(m)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{m}:{node.name}"] = _imports(node.body, m, False, nested=True)
    return out


def test_the_core_commands_need_only_the_core_dependencies():
    """What the CLI imports at module level, and what each command that needs no extra imports
    when it runs (and those modules at module level), comes from the core dependencies; the
    commands of an extra need nothing beyond it. (Imports inside the functions of those modules
    are not followed: a sampled check, with the message of fota.extras as the safety net.)"""
    problems = []
    top = _needs(_third_party(_closure(CLI_MODULES)))
    if top - CORE:
        problems.append(f"importing the CLI needs {sorted(top - CORE)}")
    for where, imported in _command_imports().items():
        allowed = set().union(CORE, *(WITH_EXTRA[e] for e in COMMAND_EXTRAS.get(where.split(":")[1], ())))
        needs = _needs(_third_party(_closure(imported)))
        if needs - allowed:
            problems.append(f"{where} needs {sorted(needs - allowed)} (extras {sorted(_extras_of(needs))}; "
                            "add it to COMMAND_EXTRAS and to the docs if that is meant)")
    assert not problems, "\n".join(problems)


def test_the_help_imports_neither_the_device_runner_nor_sqlalchemy():
    code = ("import sys; sys.argv = ['fota', '--help']; from fota.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('fota.device.runner', 'sqlalchemy', "
            "'fota.tools.supervisor', 'asyncio'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-500:]
