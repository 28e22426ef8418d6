"""Print the depth of medsight's module-level import graph and its longest chain.

How it counts: a module is every ``.py`` file under ``src/medsight`` (a package is its ``__init__``). An arrow
A -> B is an ``import`` / ``from ... import`` of a medsight module B anywhere in A: at module level and inside
function bodies alike (medsight imports most of its own modules lazily, inside the function that needs them, so
a function-level import is the arrow that matters: calling the function loads B), but not under
``if TYPE_CHECKING:``. ``--module-level`` keeps only the statements that run when A is imported (module level,
class bodies, top-level ``if`` / ``try`` / ``with`` blocks). ``from medsight.pkg import name`` counts as an arrow to
``medsight.pkg.name`` when that is a module, else to ``medsight.pkg``. The implicit import of a parent package's
``__init__`` is not counted (``medsight/__init__.py`` imports nothing). Depth is the number of modules on the
longest chain (a module importing no medsight module has depth 1). The graph must be acyclic
(tests/test_architecture.py checks that).

    python scripts/import_graph.py                   # depth, the longest chain, and each module's depth
    python scripts/import_graph.py --depth           # the depth only
    python scripts/import_graph.py --module-level    # the same for imports that run at import time only
"""

from __future__ import annotations

import argparse
import ast
import sys
from functools import lru_cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medsight"


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(body: list[ast.stmt], module_level: bool):
    """Import statements in ``body`` (TYPE_CHECKING blocks skipped; function bodies too when ``module_level``)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.orelse, module_level)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and module_level:
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, field, None)
                if isinstance(block, list) and block and isinstance(block[0], (ast.stmt, ast.excepthandler)):
                    yield from _imports(block, module_level)  # type: ignore[arg-type]


def import_graph(src: Path = SRC, module_level: bool = False) -> dict[str, set[str]]:
    """Module -> the medsight modules it imports (anywhere in its body, or at module level only)."""
    mods = modules(src)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _imports(ast.parse(path.read_text()).body, module_level):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                submods = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = submods if len(submods) == len(node.names) else [mod, *submods]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and t != "medsight":
                    graph[name].add(t)
    return graph


def longest_chains(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Module -> its longest import chain (itself first). Raises on a cycle."""

    @lru_cache(maxsize=None)
    def chain(m: str, stack: tuple[str, ...] = ()) -> tuple[str, ...]:
        if m in stack:
            raise ValueError("import cycle: " + " -> ".join((*stack, m)))
        best: tuple[str, ...] = ()
        for dep in sorted(graph[m]):
            c = chain(dep, (*stack, m))
            if len(c) > len(best):
                best = c
        return (m, *best)

    return {m: list(chain(m)) for m in graph}


def depth(graph: dict[str, set[str]] | None = None) -> tuple[int, list[str]]:
    chains = longest_chains(graph if graph is not None else import_graph())
    longest = max(chains.values(), key=lambda c: (len(c), c))
    return len(longest), longest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", action="store_true", help="print the depth only")
    ap.add_argument("--module-level", action="store_true",
                    help="count only imports that run when the importer is imported (not inside functions)")
    args = ap.parse_args(argv)
    graph = import_graph(module_level=args.module_level)
    n, chain = depth(graph)
    if args.depth:
        print(n)
        return 0
    scope = "module-level" if args.module_level else "module- and function-level"
    print(f"{len(graph)} modules; depth (modules on the longest {scope} import chain): {n}")
    print("longest chain (importer first):")
    for i, m in enumerate(chain):
        print(f"  {'  ' * i}{m}")
    print("each module's depth:")
    for m, c in sorted(longest_chains(graph).items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"  {len(c):3d}  {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
