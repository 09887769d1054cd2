"""No import cycles among ftbench's own modules, and every module imports on its own.

The graph counts every import of an ftbench module, at the top of a file or inside a function (a deferred
import hides a cycle from the interpreter, not from the reader)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods", "reports")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the ftbench modules it imports (``from harness import x`` counts as harness.x where that is a
    module; a package's ``__init__`` counts for ``import pkg.sub`` only where it is imported by name)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                names = names or [node.module]
            for name in names:
                if name in mods and name != mod:
                    graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_ftbench_modules():
    graph = import_graph()
    assert len(graph) > 30 and "harness.cell.run" in graph["harness.driver.cli"]  # the walk found the tree
    assert "harness.schema" in graph["harness.cell.loop"]  # function-level and top-level imports both count
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


_EACH_ALONE = """
import os, sys, json, importlib, traceback
# Third-party libraries first, once (importing torch takes seconds): they cannot hide an ftbench cycle. pydantic
# imports its submodules on first use: without them here every child paid 0.09 s of its 0.15-0.3 s for them.
LIBS = ("torch", "transformers", "transformers.models.auto.modeling_auto", "peft", "peft.tuners.tuners_utils",
        "bitsandbytes", "pydantic", "pydantic.main", "pydantic.fields", "pandas", "sklearn.metrics",
        "safetensors.torch", "plotly.graph_objects", "plotly.io", "plotly.offline", "yaml", "rich.console",
        "rich.progress", "psutil", "scipy.stats")
for lib in LIBS:
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
failed, running = {}, {}
for mod in json.loads(sys.argv[1]) + [None, None]:  # two children at a time: two cores
    while len(running) >= 2 or (mod is None and running):
        pid, status = os.wait()
        if status:
            failed[running[pid]] = status
        del running[pid]
        if mod is None:
            break
    if mod is None:
        continue
    pid = os.fork()
    if pid == 0:  # a child that has imported no ftbench module: this one first, alone
        try:
            importlib.import_module(mod)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    running[pid] = mod
print(json.dumps(failed))
"""


def test_each_module_imports_alone_in_a_fresh_interpreter():
    import json

    mods = sorted(m for m in _modules() if not m.endswith("__main__"))  # __main__ runs the CLI
    out = subprocess.run(
        [sys.executable, "-c", _EACH_ALONE, json.dumps(mods)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert failed == {}, out.stderr[-3000:]


def test_the_two_processes_show_in_the_tree_and_only_the_driver_knows_the_driver():
    """harness/driver/ is the `ftbench` process, harness/cell/ one run's process (issue 28). What a cell runs —
    cell/, tasks/, measure/, the shared modules, the methods, the reports — never imports the driver: a cell is
    started by it, not built from it."""
    graph = import_graph()
    driver = {m for m in graph if m.startswith("harness.driver.")}
    cell = {m for m in graph if m.startswith("harness.cell.")}
    assert {"harness.driver.cli", "harness.driver.runner", "harness.driver.suite"} <= driver
    assert {"harness.cell.run", "harness.cell.loop", "harness.cell.models"} <= cell
    for mod, deps in graph.items():
        if mod not in driver and mod != "harness.__main__":  # `python -m harness`: the command line itself
            assert not (deps & driver), f"{mod} imports the driver: {sorted(deps & driver)}"


def test_no_method_is_named_outside_its_own_file():
    """Issue 28: ftbench branches on no method's name (it widens the contract instead: memory_model, check_model's
    context, records saying what trains). The one exception: the claims name the suites/claims.yaml entries they
    read, and check them when that suite loads (reports/claim_sets.py: select; the QA-LoRA diagnostics'
    entries in reports/qalora_claims.py are method/variant strings, never a bare name)."""
    names = {"full", "lora", "qlora", "qalora"}  # "peft" is also the library's name
    allowed = {ROOT / "reports" / "claims.py"}
    found = []
    for pkg in ("harness", "reports"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path in allowed:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_every_public_function_and_class_says_what_it_is():
    """Issue 28: a one-line docstring on every public function and class of harness/, methods/ and reports/."""
    missing = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.parse(path.read_text(), str(path)).body:
                named = isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
                if named and ast.get_docstring(node) is None:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not missing, missing


def _top_level_names(path: Path) -> set[str]:
    """What a module defines or imports at its top level (inside ``if`` and ``try`` blocks too)."""
    names: set[str] = set()
    todo = list(ast.parse(path.read_text(), str(path)).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
    return names


def test_every_name_imported_from_ftbench_exists_in_the_benchmarks_and_deferred_imports_too():
    """`make bench` broke unseen: bench/decode.py imported `describe` from where it no longer lived, and no test
    imports bench/ (never part of `make test`). Every `from <ftbench module> import name`, at the top or deferred
    inside a function, in the packages, bench/, examples/, gpu/ and tests/, names something that module defines,
    read from its source (nothing is imported)."""
    mods = _modules()
    files = [p for d in (*PACKAGES, "bench", "examples", "gpu", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    defined: dict[str, set[str]] = {}
    missing = []
    for path in files:
        if path.name == "broken.py":  # a method file with a syntax error, on purpose
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods):
                continue
            names = defined.setdefault(node.module, _top_level_names(mods[node.module]))
            for a in node.names:
                if a.name != "*" and a.name not in names and f"{node.module}.{a.name}" not in mods:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {a.name} from {node.module}")
    assert not missing, missing
