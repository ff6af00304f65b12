"""The package layering (docs/architecture.md, "Layout"), read from the import statements:

* fota.tools (keys, signing, bundles, the agent's build, the unix-port supervisor) is below the
  control center: it imports nothing from fota.server;
* fota.testkit (what the tests and the benchmarks share) is never imported by shipped code;
* tests/ imports nothing from bench/; bench/ imports nothing from tests/ (both import fota.testkit).

Every `import`, `from ... import` and `__import__("...")` / `importlib.import_module("...")` with a
literal name counts, at module level or inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "fota"
TESTS = ROOT / "tests"
BENCH = ROOT / "bench"


def _module_name(path: Path) -> str:
    """fota.x.y for src/fota/x/y.py (its package for __init__.py)."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package(path: Path) -> str:
    """The package a file under src/ is in ("" elsewhere): what its relative imports start from."""
    if SRC not in path.parents:
        return ""
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def imported_names(path: Path, package: str | None = None) -> set[str]:
    """Every module a file imports: `a.b` for `import a.b` and `from a.b import c` (plus `a.b.c`,
    which may be a module), with relative imports resolved against `package` (default: the
    file's own package under src/)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _package(path) if package is None else package
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "id", None) == "__import__" or getattr(node.func, "attr", None) == "import_module")):
            names.add(node.args[0].value)
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def offenders(files, forbidden: str) -> dict[str, list[str]]:
    """file -> the names it imports from `forbidden` (a package), for the files that do."""
    found = {}
    for path in files:
        bad = sorted(n for n in imported_names(path) if _within(n, forbidden))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def _py(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def shipped_files() -> list[Path]:
    """Everything under src/fota except fota.testkit."""
    return [p for p in _py(SRC) if (SRC / "testkit") not in p.parents]


def test_the_scan_sees_imports_of_every_form(tmp_path):
    """The scan itself: plain, from, relative, inside a function, and __import__."""
    probe = tmp_path / "probe.py"
    probe.write_text("import a.b\nfrom c import d\nfrom .signing import sign\nfrom .. import server\n"
                     "def f():\n    from e.f import g\n    __import__('h.i')\n")
    names = imported_names(probe, package="fota.tools")
    assert {"a.b", "c", "c.d", "fota.tools.signing", "fota.tools.signing.sign", "fota", "fota.server",
            "e.f", "e.f.g", "h.i"} <= names, names


def test_fota_tools_imports_nothing_from_the_server():
    """Keys, signing and bundles are below the control center (fota.server imports them)."""
    assert offenders(_py(SRC / "tools"), "fota.server") == {}


# The one exception: `fota demo --board esp32` runs emulated boards, and the emulations live in
# the test kit (fota.testkit.boards), never in the agent (docs/boards.md, "Demo on emulated ESP32s").
# It loads fota.testkit.boards and nothing else of the kit.
DEMO_ON_EMULATED_BOARDS = SRC / "demo_board.py"


def test_shipped_code_never_imports_the_testkit():
    assert (SRC / "testkit" / "__init__.py").exists()
    others = [p for p in shipped_files() if p != DEMO_ON_EMULATED_BOARDS]
    assert offenders(others, "fota.testkit") == {}
    from_kit = offenders([DEMO_ON_EMULATED_BOARDS], "fota.testkit")
    assert from_kit and all(_within(n, "fota.testkit.boards") for n in from_kit["src/fota/demo_board.py"]), from_kit


def test_tests_import_nothing_from_bench_and_bench_nothing_from_tests():
    assert offenders(_py(TESTS), "bench") == {}
    test_modules = {p.stem for p in _py(TESTS)}
    from_tests = {}
    for path in _py(BENCH):
        bad = sorted(n for n in imported_names(path) if n.split(".")[0] in test_modules)
        if bad:
            from_tests[str(path.relative_to(ROOT))] = bad
    assert from_tests == {}


def test_the_testkit_imports_neither_tests_nor_bench():
    kit = _py(SRC / "testkit")
    assert offenders(kit, "bench") == {}
    # tests/boards re-exports the board emulations under the board modules' own names (esp32,
    # machine, network): the testkit's emulations import each other by those names.
    test_modules = {p.stem for p in _py(TESTS) if (TESTS / "boards") not in p.parents}
    assert {str(p): n for p in kit for n in imported_names(p) if n.split(".")[0] in test_modules} == {}
