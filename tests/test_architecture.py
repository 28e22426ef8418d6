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


def _literal_strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def task_name_comparisons(source: str, names) -> list[int]:
    """Lines of ``source`` that branch on a task-type name written as a string literal: ``==`` / ``!=`` / ``in`` /
    ``not in`` (against a literal or a tuple, list or set of literals), ``match`` cases, and dict literals keyed by
    task names (dispatch tables)."""
    names = set(names)
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hit = any(_literal_strings(x) & names for x in [node.left, *node.comparators])
        elif isinstance(node, ast.MatchValue):
            hit = bool(_literal_strings(node.value) & names)
        elif isinstance(node, ast.Dict):
            hit = any(k is not None and _literal_strings(k) & names for k in node.keys)
        else:
            hit = False
        if hit:
            lines.append(node.lineno)
    return sorted(lines)


def test_the_task_name_check_sees_every_form():
    src = ('if task == "binary": pass\nif "multilabel" != t: pass\nif t in ("ordinal", "x"): pass\n'
           'if t not in ["multiclass"]: pass\nmatch t:\n    case "binary": pass\nd = {"ordinal": 1}\n'
           'ok = t == "binaryish" or t == other\nlabel = "binary"\n')
    assert task_name_comparisons(src, ("binary", "multiclass", "multilabel", "ordinal")) == [1, 2, 3, 4, 6, 7]


def test_only_tasks_compares_task_names():
    """What a task kind means lives in tasks.py (its TaskKind classes); everything else asks the kind."""
    from medsight.tasks import TASK_TYPES

    offenders = [f"{p.relative_to(SRC)}:{line}" for p in sorted(SRC.rglob("*.py")) if p != SRC / "tasks.py"
                 for line in task_name_comparisons(p.read_text(), TASK_TYPES)]
    assert offenders == [], f"task-type names compared outside tasks.py: {offenders}"


def test_config_and_bundle_take_their_task_names_from_tasks():
    from medsight.bundle import BundleMeta
    from medsight.config import DataConfig
    from medsight.tasks import KINDS, TASK_TYPES

    assert TASK_TYPES == tuple(KINDS)
    for name in TASK_TYPES:
        assert DataConfig(task=name).task == name
    assert all(name in BundleMeta.model_fields["task"].description for name in TASK_TYPES)
