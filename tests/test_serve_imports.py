"""Architecture: the service reaches the model only through the Predictor (issue 21: "the Predictor is the
service's only door"). Every import in ``medsight/serve/`` (top level and inside functions) of a medsight module
must be one of the allowed ones; readers, preprocessing, inference, metrics, calibration... are the Predictor's."""

from __future__ import annotations

import ast
from pathlib import Path

import medsight

SERVE = Path(medsight.__file__).parent / "serve"
ALLOWED = {"medsight", "medsight.predict", "medsight.review", "medsight.bundle", "medsight.errors",
           "medsight.progress", "medsight.utils"}


def _medsight_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "medsight"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "medsight":
            out.append((node.lineno, node.module))
            if node.module == "medsight":  # `from medsight import x` imports the module medsight.x when it is one
                out += [(node.lineno, f"medsight.{a.name}") for a in node.names
                        if (SERVE.parent / f"{a.name}.py").is_file() or (SERVE.parent / a.name).is_dir()]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            out.append((node.lineno, "__import__ (dynamic)"))
    return out


def test_serve_imports_only_the_predictor_side_of_medsight():
    files = sorted(SERVE.rglob("*.py"))
    assert files, SERVE
    bad = [f"{f.relative_to(SERVE.parent)}:{line} imports {mod}"
           for f in files for line, mod in _medsight_imports(f)
           if mod not in ALLOWED and not mod.startswith("medsight.serve")]
    assert not bad, "serve/ must go through medsight.predict / medsight.review:\n" + "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from medsight.data.io import read_image_bytes\n    import medsight.metrics\n")
    assert [m for _, m in _medsight_imports(f)] == ["medsight.data.io", "medsight.metrics"]
