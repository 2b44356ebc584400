"""The house rules of docs/architecture.md: no import cycles in compress/, and no import from a lower layer up."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.importgraph import (
    Layers,
    find_cycles,
    graph_of,
    module_files,
    package_edges,
    read_layers,
    stale_prefixes,
    unplaced,
    upward_imports,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "compress"
DOC = ROOT / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def layers() -> Layers:
    return read_layers(DOC.read_text())


def layered_modules() -> list[str]:
    """Every module of compress/ except the root package itself (it holds only the version)."""
    return [name for name in module_files(PACKAGE) if name != PACKAGE.name]


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package `root/pkg` with the given modules (name -> source); returns its directory."""
    package = root / "pkg"
    for name, source in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(source)
    return package


# ------------------------------------------------------------------------------------------------ compress itself


def test_compress_has_no_import_cycles():
    cycles = find_cycles(graph_of(package_edges(PACKAGE), module_files(PACKAGE)))
    assert not cycles, "import cycles in compress/ (see docs/architecture.md):\n  " + "\n  ".join(cycles)


def test_every_module_has_a_layer(layers):
    missing = unplaced(layered_modules(), layers)
    assert not missing, f"modules in no layer: {missing}; add them to the layer table of docs/architecture.md"
    stale = stale_prefixes(layered_modules(), layers)
    assert not stale, f"docs/architecture.md lists {stale}, which name no module of compress/"


def test_no_import_goes_up_a_layer(layers):
    upward = upward_imports(package_edges(PACKAGE), layers)
    assert not upward, "imports against the layers of docs/architecture.md:\n  " + "\n  ".join(upward)


def test_the_layer_table_reads_bottom_up(layers):
    names = [name for name, _ in layers]
    assert names[0] == "foundation" and names[-1] == "cli", names
    assert len(set(names)) == len(names), names


# ------------------------------------------------------------------------------------------- the checker, on fixtures


def test_checker_finds_a_cycle_through_relative_and_function_level_imports(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from pkg import b\n",
        "b.py": "def later():\n    import pkg.c.inner\n",
        "c/__init__.py": "",
        "c/inner.py": "from ...pkg import a\nfrom .. import a as again\n",
        "d.py": "from pkg import a\n",  # imports into the cycle but is not part of it
    })
    cycles = find_cycles(graph_of(package_edges(package), module_files(package)))
    assert cycles == ["pkg.a -> pkg.b -> pkg.c.inner -> pkg.a"]


def test_checker_finds_two_modules_importing_each_other_and_import_module_calls(tmp_path):
    package = write_package(tmp_path, {
        "x.py": "from pkg.y import thing\n",
        "y.py": "import importlib\nthing = 1\nmod = importlib.import_module('pkg.x')\n",
    })
    assert find_cycles(graph_of(package_edges(package))) == ["pkg.x -> pkg.y -> pkg.x"]


def test_checker_ignores_type_checking_imports_and_accepts_an_acyclic_package(tmp_path):
    package = write_package(tmp_path, {
        "low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import H\n"
                  "else:\n    import os\n",
        "high.py": "import typing\nfrom pkg import low\nif typing.TYPE_CHECKING:\n    import pkg.low\n",
    })
    edges = package_edges(package)
    assert [(e.importer, e.imported) for e in edges] == [("pkg.high", "pkg.low")]
    assert find_cycles(graph_of(edges)) == []


def test_checker_flags_an_import_up_a_layer(tmp_path):
    package = write_package(tmp_path, {
        "base/__init__.py": "",
        "base/util.py": "def helper():\n    from pkg.top import run\n",
        "top.py": "from pkg.base import util\n",
    })
    layers = read_layers("intro\n\n| layer | modules |\n|---|---|\n| bottom | `pkg.base`, `pkg` |\n"
                         "| upper | `pkg.top` |\n\nafter\n")
    assert layers == [("bottom", ["pkg.base", "pkg"]), ("upper", ["pkg.top"])]
    upward = upward_imports(package_edges(package), layers)
    assert upward == ["pkg.base.util (layer 'bottom', line 2) imports pkg.top (layer 'upper', higher)"]


def test_checker_reports_modules_without_a_layer_and_stale_entries(tmp_path):
    layers = read_layers("| layer | modules | notes |\n|---|---|---|\n| one | pkg.a, pkg.gone | x |\n")
    assert unplaced(["pkg.a", "pkg.a.sub", "pkg.b"], layers) == ["pkg.b"]
    assert stale_prefixes(["pkg.a", "pkg.b"], layers) == ["pkg.gone"]
