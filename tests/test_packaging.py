"""Package hygiene: one version source, the licence the metadata names, typing marker, bounded dependencies."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_source(pyproject):
    import medsight

    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "medsight.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", medsight.__version__)


def test_license_file_matches_metadata(pyproject):
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_py_typed_is_shipped(pyproject):
    assert (ROOT / "src" / "medsight" / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["medsight"]


def test_dependencies_are_bounded_and_constraints_cover_them(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    # every extra is bounded and pinned; `medsight[a,b]` inside an extra names the project's own extras
    deps = pyproject["project"]["dependencies"] + [d for ds in extras.values() for d in ds
                                                   if not d.startswith("medsight[")]
    for d in extras["dev"]:
        if d.startswith("medsight["):
            assert set(Requirement(d).extras) <= set(extras), f"{d}: names an extra that does not exist"
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pinned[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    assert "medsight" not in pinned
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ]", dep, maxsplit=1)[0]).lower()
        assert "<" in dep, f"{dep}: no upper bound"
        assert name in pinned, f"{name} is not pinned in constraints.txt (run scripts/lock.sh)"
        assert Requirement(dep).specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside {dep}"
