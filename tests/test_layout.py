"""The shape of the code: the top-level modules import each other as a DAG of at most 4 levels, common.py imports
nothing from the project, no module imports train.py, project imports sit at the top of a file, files stay short."""
import ast

from conftest import ROOT

MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}


def project_imports(path, top_level_only=False):
    """The project modules a file imports (anywhere in it, or only in its top-level statements)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {path.stem}


def levels(graph):
    """Level 1: imports nothing from the project; else 1 + the highest level imported. Raises on a cycle."""
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
    graph = {m: project_imports(p) for m, p in MODULES.items()}
    lv = levels(graph)
    assert max(lv.values()) <= 4, lv
    assert graph["common"] == set() and graph["model"] == set()
    assert not [m for m, deps in graph.items() if "train" in deps]


def test_the_cycle_check_finds_a_cycle():
    try:
        levels({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    except AssertionError as e:
        assert "a -> b -> c -> a" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")


def test_no_lazy_project_imports_and_short_files():
    lazy = {m: project_imports(p) - project_imports(p, top_level_only=True) for m, p in MODULES.items()}
    assert not {m: d for m, d in lazy.items() if d}
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long and len(MODULES) <= 14, (long, sorted(MODULES))
