"""The seam between the harness and the benchmarks: no module of stemdl.harness imports a workload (nor
names one to import), so that a benchmark is added in its own folder plus a registry line."""

import ast
from pathlib import Path

import stemdl.harness

HARNESS = Path(stemdl.harness.__file__).parent


def workload_references(path: Path) -> list[str]:
    """Imports of stemdl.workloads, and string constants outside docstrings naming it (import_module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["." * node.level + (node.module or "")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names = [node.value]
        found += [f"{path.name}:{node.lineno}: {name}" for name in names
                  if "stemdl.workloads" in name or name.startswith("..workloads")]
    return found


def test_no_harness_module_imports_a_workload():
    modules = sorted(HARNESS.rglob("*.py"))
    assert len(modules) > 15, "the harness package was found"
    assert [ref for path in modules for ref in workload_references(path)] == []


def test_the_check_sees_an_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""stemdl.workloads in a docstring is fine."""\nimport importlib\n'
                   'from stemdl.workloads.spacegroup import heads\nimportlib.import_module("stemdl.workloads.x")\n')
    assert [ref.split(": ")[1] for ref in workload_references(bad)] == ["stemdl.workloads.spacegroup",
                                                                         "stemdl.workloads.x"]
