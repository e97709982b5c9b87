"""The package's architecture, as its folders promise it (a test about internals)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import flask_staleguard
from tests.helpers import parse

PACKAGE = pathlib.Path(flask_staleguard.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    """The package's own modules ``path`` imports when it runs (not for typing)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
        package = module
    else:
        package = module.rpartition(".")[0]
    found: set[str] = set()
    tree = parse(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # typing-only imports make no circle at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {n for n in names if _is_module(n)} or {target}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("flask_staleguard"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("flask_")}
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        graph[name.removesuffix(".__init__")] = _imports(path)
    return graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            for target in graph.get(module, ()):
                if target == goal:
                    return True
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return False

    circles = sorted(m for m in graph if reaches(m, m))
    assert circles == []


_WITHOUT_FLASK = """
import importlib, importlib.abc, importlib.util, pkgutil, sys

class NoFlask(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flask", "flask_sqlalchemy", "werkzeug"):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, NoFlask())
# The package's __init__ imports the Flask extension: load the core on its own.
spec = importlib.util.spec_from_file_location(
    "flask_staleguard", PACKAGE + "/__init__.py", submodule_search_locations=[PACKAGE]
)
sys.modules["flask_staleguard"] = importlib.util.module_from_spec(spec)
import flask_staleguard.core as core
for module in pkgutil.iter_modules(core.__path__, "flask_staleguard.core."):
    importlib.import_module(module.name)
print(sorted(m for m in sys.modules if m.startswith("flask")))
"""


@pytest.mark.integration  # starts an interpreter
def test_the_core_runs_without_flask() -> None:
    code = f"PACKAGE = {str(PACKAGE)!r}\n{_WITHOUT_FLASK}"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = ast.literal_eval(result.stdout)
    assert "flask_staleguard.core.guard" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("flask", "flask_sqlalchemy")]
