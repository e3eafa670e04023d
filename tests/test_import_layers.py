"""Issue 25: the subpackages of `src/clipdistill` import each other without a cycle and only downwards
(cli > train, eval, curate > models > data, losses > errors, paths, ...). The checker and the layer table
are benchmarks/import_graph.py (which also writes docs/import_graph.md); it reads the source with `ast`,
so nothing is imported. Imports inside functions count; those under `if TYPE_CHECKING:` do not (they
never run: data names `models.base.ClipModel`/`ImageConfig` in annotations only)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "import_graph.py"


@pytest.fixture(scope="module")
def graph():
    spec = importlib.util.spec_from_file_location("bench_import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_import_graph"] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_import_graph", None)


def test_src_has_no_cycle_and_no_upward_arrow(graph):
    arrows = graph.edges()
    assert ("train", "models") in arrows and ("models", "data") in arrows  # the reader sees the real graph
    assert graph.problems(arrows) == []


def test_every_subpackage_and_top_level_module_has_a_layer(graph):
    nodes = {graph.node_of(graph.module_name(p, graph.PACKAGE_DIR)) for p in graph.PACKAGE_DIR.rglob("*.py")}
    assert nodes <= set(graph.LAYERS), sorted(nodes - set(graph.LAYERS))


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_finds_a_cycle_and_an_upward_arrow(graph, tmp_path):
    pkg = tmp_path / "clipdistill"
    _write(
        pkg,
        {
            "__init__.py": "",
            "errors.py": "",
            "models/__init__.py": "",
            "models/base.py": """
                from typing import TYPE_CHECKING

                from clipdistill import errors

                if TYPE_CHECKING:
                    from clipdistill.cli import main  # never runs: left out

                def build():
                    from clipdistill.train.engine import run  # lazy, still an arrow
                    return run
            """,
            "train/__init__.py": "",
            "train/engine.py": "from ..models import base\n\nrun = None\n",
            "cli/__init__.py": "",
            "cli/main.py": "import clipdistill.train.engine\n",
        },
    )
    layers = {"cli": 3, "train": 2, "models": 1, "errors": 0, "clipdistill": 0}
    arrows = graph.edges(pkg)
    assert set(arrows) == {("models", "errors"), ("models", "train"), ("train", "models"), ("cli", "train")}
    assert graph.edges(pkg, type_checking=True).keys() == {("models", "cli")}
    found = graph.problems(arrows, layers, allowed={})
    assert found[0] == "cycle: models <-> train"
    assert found[1].startswith("upward arrow models (layer 1) -> train (layer 2): clipdistill.models.base:")
    assert len(found) == 2
    # an allowed arrow is no longer reported, but the cycle it closes still is
    assert graph.problems(arrows, layers, allowed={("models", "train"): "why"}) == ["cycle: models <-> train"]
    # a node missing from the table is reported
    assert "train has no layer (add it to LAYERS)" in graph.problems(arrows, {"cli": 1}, allowed={})
