"""The import graph's shape: training never loads the serving stack, and the tower stays low.

The graph is scripts/import_graph.py's (imports anywhere in a module, function bodies included, since medsight
imports its own modules lazily; ``if TYPE_CHECKING:`` blocks excluded). "Reaches" means directly or through
other modules.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"
_spec = importlib.util.spec_from_file_location("medsight_import_graph", _SCRIPT)
assert _spec is not None and _spec.loader is not None
ig = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ig
_spec.loader.exec_module(ig)

MAX_DEPTH = 14  # modules on the longest chain after issue 21 (20 before); raise it only with a reason
TRAINING = ("medsight.pipeline", "medsight.train", "medsight.tracking")
SERVING = ("medsight.predict", "medsight.serve", "medsight.mlflow_model")


def _reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` reaches -> the module it was reached from (for the path in a failure message)."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        m = todo.pop()
        for dep in sorted(graph[m]):
            if dep not in seen and dep != start:
                seen[dep] = m
                todo.append(dep)
    return seen


def _path(seen: dict[str, str], start: str, end: str) -> str:
    chain = [end]
    while chain[-1] != start:
        chain.append(seen[chain[-1]])
    return " -> ".join(reversed(chain))


@pytest.fixture
def graph() -> dict[str, set[str]]:
    return _graph(False)


@functools.cache
def _graph(module_level: bool) -> dict[str, set[str]]:
    return ig.import_graph(module_level=module_level)


@pytest.mark.parametrize("module_level", [False, True], ids=["all-imports", "module-level"])
@pytest.mark.parametrize("trainer", TRAINING)
def test_training_does_not_reach_the_serving_stack(trainer, module_level):
    graph = _graph(module_level)
    seen = _reach(graph, trainer)
    bad = [m for m in seen if any(m == s or m.startswith(s + ".") for s in SERVING)]
    assert bad == [], "training imports serving: " + "; ".join(_path(seen, trainer, m) for m in bad)


def test_depth_stays_low(graph):
    n, chain = ig.depth(graph)
    assert n <= MAX_DEPTH, f"import depth {n} > {MAX_DEPTH}: " + " -> ".join(chain)


def test_the_graph_sees_function_level_and_relative_imports(graph):
    assert "medsight.inference" in graph["medsight.predict"]  # imported inside Predictor methods
    assert "medsight.errors" in graph["medsight.metrics"]  # relative import
    assert "medsight.serve.app" in graph["medsight.serve"]  # package __init__


def test_depth_counts_modules_on_the_longest_chain():
    g = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": set()}
    assert ig.depth(g) == (3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="import cycle"):
        ig.depth({"a": {"b"}, "b": {"a"}})


def test_type_checking_and_function_imports_are_told_apart(tmp_path):
    pkg = tmp_path / "medsight"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from medsight import b\n"
                              "def f():\n    from medsight import c\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("import medsight.b\n")
    assert ig.import_graph(pkg)["medsight.a"] == {"medsight.c"}
    assert ig.import_graph(pkg, module_level=True)["medsight.a"] == set()
    assert ig.import_graph(pkg, module_level=True)["medsight.c"] == {"medsight.b"}
