"""The shape of the code: no import cycles (lazy imports inside functions included), one owner per question."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medsight"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the medsight modules it imports anywhere in its body (top level or inside functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and t.startswith("medsight") and t != "medsight":
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_imports():
    g = import_graph()
    assert "medsight.inference" in g["medsight.predict"]  # imported inside Predictor.outputs
    assert "medsight.errors" in g["medsight.metrics"]  # relative import


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert cycles == [], "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_only_the_reader_knows_file_signatures():
    """DICOM / NIfTI / PNG / JPEG magic numbers appear in the readers' package (data/readers/) only."""
    magic = re.compile(r"DICM|\\x89PNG|\\xff\\xd8|n\+1|ni1\\x00|\\x1f\\x8b")
    readers = SRC / "data" / "readers"
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if readers not in p.parents and magic.search(p.read_text())]
    assert offenders == [], f"file-format magic numbers outside data/readers/: {offenders}"
    assert any(magic.search(p.read_text()) for p in readers.glob("*.py"))  # the pattern still finds them there


def test_only_inference_runs_the_model_over_images():
    """No module other than inference.py loops a model over batches of stored images (the trainer's own step
    and occlusion's batches of perturbed copies of one input are not evaluation passes)."""
    allowed = {"inference.py", "train.py", "explain.py"}
    loop = re.compile(r"for .* in range\(0, len\(.*\)\s*,.*\):\n(?:.*\n){0,6}.*model\(")
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.name not in allowed and loop.search(p.read_text())]
    assert offenders == [], offenders
