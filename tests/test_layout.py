"""The shape of the code: the top level holds the regression paper's core (at most 10 modules and
TOP_LINES lines), its modules and the packages analysis/, fast/ and lm/ import each other as a DAG
of at most 7 levels; sgld.py imports at most the optional fast/, which imports nothing else of the
project; no module imports train.py, no package imports a script; project imports sit at the top
of a file (except data.py's lazy import of the language-model package lm/, named in its task
table); no line over 100 characters, no function over 60 lines; no top-level module imports lm/,
and the regression path loads neither lm/ nor the LM's third-party packages (tokenizers, requests,
huggingface_hub)."""
import ast
import subprocess
import sys

from conftest import ROOT

TOP = {p.stem: p for p in sorted(ROOT.glob("*.py"))}
PACKAGES = ("analysis", "fast", "lm")
PACKAGE = {(pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"): p
           for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}
MODULES = {**TOP, **PACKAGE}  # module name -> file
LAZY_ALLOWED = {"data": {"lm.data"}}  # data.TASKS["lm"] = "lm.data:KIND", resolved with importlib
TOP_LINES = 2800  # issue 18: the regression core at the top level in at most 2,800 lines


def _name(module, names=()):
    """The project module an import statement names ('lm.eval' for import lm.eval / from lm import
    eval)."""
    out = set()
    for n in names or [module]:
        for cand in (f"{module}.{n}" if names else module, module):
            if cand in MODULES:
                out.add(cand)
                break
    return out


def project_imports(path, top_level_only=False):
    """The project modules a file imports (anywhere in it, or only in its top-level statements)."""
    tree = ast.parse(path.read_text())
    top = [n for stmt in tree.body  # a top-level try: import (an optional module) counts as top
           for n in ([stmt, *stmt.body] if isinstance(stmt, ast.Try) else [stmt])]
    nodes = top if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                found |= _name(a.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= _name(node.module, [a.name for a in node.names])
    me = next(m for m, p in MODULES.items() if p == path)
    return found - {me}


def importlib_targets(path):
    """The string constants 'lm.<module>:attribute' of a file: the package's lazy imports."""
    tree = ast.parse(path.read_text())
    consts = {n.value.partition(":")[0] for n in ast.walk(tree)
              if isinstance(n, ast.Constant) and isinstance(n.value, str) and ":" in n.value}
    return consts & {m for m in PACKAGE if m.startswith("lm.")}


def levels(graph):
    """Level 1: imports nothing from the project; else 1 + the highest level imported. Raises on a
    cycle."""
    level, visiting = {}, []

    def visit(m):
        if m in visiting:
            raise AssertionError(f"import cycle: {' -> '.join(visiting[visiting.index(m):] + [m])}")
        if m not in level:
            visiting.append(m)
            level[m] = 1 + max((visit(d) for d in graph[m]), default=0)
            visiting.pop()
        return level[m]
    for m in graph:
        visit(m)
    return level


def test_the_import_graph_is_a_shallow_dag():
    """sgld.py is copyable alone: it imports at most the optional fast paths (fast/), which import
    nothing else of the project, and model.py nothing at all; common.py only what sgld.py holds for
    it; no module imports train.py."""
    graph = {m: project_imports(p) for m, p in MODULES.items()}
    lv = levels(graph)
    assert max(lv.values()) <= 7, lv
    fast = {m for m in MODULES if m.split(".")[0] == "fast"}
    assert graph["sgld"] <= {"fast"} and graph["model"] == set()
    assert not {m: graph[m] - fast for m in fast if graph[m] - fast}
    assert graph["common"] <= {"sgld"}
    assert not [m for m, deps in graph.items() if "train" in deps]


def test_the_packages_import_no_script_and_the_top_level_no_lm():
    graph = {m: project_imports(p) for m, p in MODULES.items()}
    assert not [m for m, deps in graph.items() if m in PACKAGE and deps & {"llc", "analyze"}]
    assert not {m: d for m, d in graph.items() if m in TOP and any(x.startswith("lm") for x in d)}


def test_the_cycle_check_finds_a_cycle():
    try:
        levels({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    except AssertionError as e:
        assert "a -> b -> c -> a" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")


SKIP = {"peers", "out", "data", "__pycache__"}  # built or written by tools: not the code
SOURCES = [p for p in sorted(ROOT.rglob("*.py"))
           if not any(part.startswith(".") or part in SKIP for part in p.relative_to(ROOT).parts)]


def test_no_lazy_project_imports_few_files_short_lines_and_functions():
    lazy = {m: project_imports(p) - project_imports(p, top_level_only=True)
            for m, p in MODULES.items()}
    assert not {m: d for m, d in lazy.items() if d}
    by_string = {m: importlib_targets(p) - LAZY_ALLOWED.get(m, set()) for m, p in TOP.items()}
    assert not {m: d for m, d in by_string.items() if d}
    assert len(TOP) <= 10, sorted(TOP)
    lines = {m: len(p.read_text().splitlines()) for m, p in TOP.items()}
    assert sum(lines.values()) <= TOP_LINES, lines
    long_lines = {str(p.relative_to(ROOT)): n for p in SOURCES
                  if (n := sum(len(ln) > 100 for ln in p.read_text().splitlines()))}
    assert not long_lines  # every .py file of the project, tests and configs included
    files = [*MODULES.values(), *sorted((ROOT / "bench").glob("*.py"))]
    long_fns = set()
    for path in files:
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if n.end_lineno - n.lineno + 1 > 60:
                    long_fns.add(f"{path.relative_to(ROOT)}:{n.name}")
    assert not long_fns  # tests excepted


LM_ONLY = ("lm", "tokenizers", "requests", "huggingface_hub")
REGRESSION_PATH = f"""
import sys
import train, llc, analyze, data
cfg = dict(train.DEFAULTS)
data.task_for(cfg).sample(__import__("torch").Generator().manual_seed(0), 2)
data.build_model(cfg, 0)
print(sorted(m for m in sys.modules if m.split(".")[0] in {LM_ONLY!r}))
"""


def test_the_regression_path_loads_nothing_of_the_language_model():
    r = subprocess.run([sys.executable, "-c", REGRESSION_PATH], capture_output=True, text=True,
                       cwd=ROOT,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_an_lm_config_reaches_the_package_through_the_task_table():
    r = subprocess.run([sys.executable, "-c", "import sys, data; data.kind({'task': 'lm'}); "
                        "print('lm.data' in sys.modules)"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
