"""The package layout: no import cycle, a short top level, small modules and functions.

The import graph is read from the source with ``ast`` (imports at module level and inside
functions, relative and absolute), so a cycle that only bites at call time is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
BENCH = Path(__file__).resolve().parents[1] / "bench"
MAX_TOP_LEVEL, MAX_MODULE_LINES, MAX_FUNCTION_LINES = 14, 400, 60
# Each part of detoxrl imports only from parts of a lower layer or its own (the package
# docstrings say the same). ``detoxrl`` itself holds the version and lazy exports only.
LAYERS = [("detoxrl", "detoxrl.errors"), ("detoxrl.config",), ("detoxrl.runs",),
          ("detoxrl.models",), ("detoxrl.data",), ("detoxrl.evaluation",),
          ("detoxrl.rl", "detoxrl.supervised"), ("detoxrl.demo",), ("detoxrl.commands",),
          ("detoxrl.cli",), ("detoxrl.__main__",)]


def module_names(root: Path, package: str | None) -> dict[str, Path]:
    """Dotted name -> file, for every .py under ``root`` (``package`` prefixes the names)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join([package, *parts] if package else parts)] = path
    return names


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules ``name`` imports anywhere in its file.

    ``from P import x`` counts as an import of ``P.x`` when that is a module, else of ``P``;
    ``import a.b.c`` imports ``a.b.c``.
    """
    package = name if _is_package(path) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    found.add(f"{source}.{alias.name}")
                elif source in known:
                    found.add(source)
    found.discard(name)
    return found


def import_graph(root: Path, package: str | None) -> dict[str, set[str]]:
    known = module_names(root, package)
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_in_src():
    cycle = find_cycle(import_graph(SRC / "detoxrl", "detoxrl"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_in_bench():
    # The scripts import each other by file name (bench/ is on sys.path when they run).
    cycle = find_cycle(import_graph(BENCH, None))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def layer(module: str) -> int:
    """The layer of a module: that of the longest part of LAYERS it falls under."""
    best, found = "", None
    for index, parts in enumerate(LAYERS):
        for part in parts:
            if (module == part or module.startswith(part + ".")) and len(part) > len(best):
                best, found = part, index
    assert found is not None, f"{module} is in no layer of tests/test_layout.py"
    return found


def test_packages_import_only_lower_layers():
    upward = [f"{name} -> {dep}" for name, deps in import_graph(SRC / "detoxrl", "detoxrl").items()
              for dep in deps if layer(dep) > layer(name)]
    assert not upward, upward


@pytest.mark.parametrize("code,cycle", [
    ({"a/__init__.py": "", "a/x.py": "from .y import f\n",
      "a/y.py": "def f():\n    from . import x\n"}, True),
    ({"a/__init__.py": "", "a/x.py": "from ..a import y\n", "a/y.py": "import a.z\n",
      "a/z.py": "def g():\n    from a.x import h\n"}, True),
    ({"a/__init__.py": "from .x import f\n", "a/x.py": "from .y import f\n",
      "a/y.py": "def f():\n    pass\n"}, False),
])
def test_the_cycle_check_finds_cycles(tmp_path, code, cycle):
    for name, text in code.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = find_cycle(import_graph(tmp_path / "a", "a"))
    assert (found is not None) == cycle, found


def test_top_level_is_short():
    entries = [p for p in (SRC / "detoxrl").iterdir()
               if p.name != "__pycache__" and (p.suffix == ".py" or p.is_dir())]
    assert len(entries) <= MAX_TOP_LEVEL, sorted(p.name for p in entries)


def _python_files() -> list[Path]:
    return sorted((SRC / "detoxrl").rglob("*.py"))


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(SRC)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(SRC)}:{node.lineno} "
                                          f"{node.name}: {length} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_every_package_says_what_it_holds():
    missing = [str(p.relative_to(SRC)) for p in _python_files() if p.name == "__init__.py"
               and not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not missing, missing
