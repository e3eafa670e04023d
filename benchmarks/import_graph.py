"""The import graph of `src/clipdistill` between its subpackages, read from the source with `ast` (nothing
is imported), checked against the layer table below and written to docs/import_graph.md.

    python benchmarks/import_graph.py            # print the graph and the check; rewrite docs/import_graph.md
    python benchmarks/import_graph.py --check    # print only; exit 1 on a cycle or an upward arrow

Nodes are the subpackages (`cli`, `train`, ...) and the top-level modules (`errors`, `paths`, ...). Every
import counts, at module level or inside a function (a lazy import is still a dependency); imports under
`if TYPE_CHECKING:` do not (they never run). tests/test_import_layers.py runs the same check.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "clipdistill"
DOC = ROOT / "docs" / "import_graph.md"

# Higher layers may import lower ones and their own layer (without a cycle), never a higher one. models
# builds on data (teachers that read shards and caches) and losses (loss functions teachers are fitted
# with), so both sit below it: data names the model interface in annotations only.
LAYERS: dict[str, int] = {
    "cli": 5,
    "train": 4,
    "eval": 4,
    "curate": 4,
    "models": 3,
    "losses": 2,
    "data": 2,
    "errors": 1,
    "paths": 1,
    "checks": 1,
    "yaml_file": 1,
    "clipdistill": 1,  # the package's own __init__ (its version string)
}

# Arrows allowed although they break the layer table, each with its reason. None at present.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as a module path inside the package, with where it was read."""

    source: str  # importing module, e.g. "clipdistill.data.loader"
    target: str  # imported module, e.g. "clipdistill.models.base"
    line: int


def module_name(path: Path, package_dir: Path) -> str:
    """`clipdistill.data.loader` for package_dir/data/loader.py; `clipdistill.data` for its __init__."""
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, type_checking: bool = False) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import in `tree`, at any depth, except the body of `if TYPE_CHECKING:` (its else runs);
    with `type_checking`, only the imports in such bodies."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, guarded = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if guarded == type_checking:
                yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, True) for child in node.body)
            stack.extend((child, guarded) for child in node.orelse)
        else:
            stack.extend((child, guarded) for child in ast.iter_child_nodes(node))


def imports_of(path: Path, package_dir: Path, type_checking: bool = False) -> list[Import]:
    """The imports of one module that land inside the package (`from X import n` names the submodule X.n
    when there is one, else X); with `type_checking`, only those under `if TYPE_CHECKING:`."""
    package = package_dir.name
    name = module_name(path, package_dir)
    is_init = path.name == "__init__.py"
    modules = _known_modules(package_dir)
    found = []
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path)), type_checking):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".")
                base = base if is_init else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{stem}.{alias.name}"
                targets.append(sub if sub in modules else stem)
        for target in targets:
            if target == package or target.startswith(package + "."):
                found.append(Import(name, target, node.lineno))
    return found


_MODULE_CACHE: dict[Path, frozenset[str]] = {}


def _known_modules(package_dir: Path) -> frozenset[str]:
    if package_dir not in _MODULE_CACHE:
        _MODULE_CACHE[package_dir] = frozenset(module_name(p, package_dir) for p in package_dir.rglob("*.py"))
    return _MODULE_CACHE[package_dir]


def node_of(module: str) -> str:
    """The graph node of a module: its subpackage or top-level module (`data` for clipdistill.data.x),
    or the package itself for its __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def edges(
    package_dir: Path = PACKAGE_DIR, type_checking: bool = False
) -> dict[tuple[str, str], list[Import]]:
    """Node -> node arrows (self-arrows left out), each with the imports that make it; with
    `type_checking`, the arrows made only of imports under `if TYPE_CHECKING:`."""
    out: dict[tuple[str, str], list[Import]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for imp in imports_of(path, package_dir, type_checking):
            a, b = node_of(imp.source), node_of(imp.target)
            if a != b and imp not in out.get((a, b), []):
                out.setdefault((a, b), []).append(imp)
    return out


def cycles(arrows: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in arrows:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def problems(
    arrows: dict[tuple[str, str], list[Import]],
    layers: dict[str, int] = LAYERS,
    allowed: dict[tuple[str, str], str] = ALLOWED,
) -> list[str]:
    """One line per cycle, per arrow to a higher layer (not in `allowed`) and per node missing from `layers`."""
    out = [f"cycle: {' <-> '.join(c)}" for c in cycles(arrows)]
    for (a, b), imps in sorted(arrows.items()):
        for node in (a, b):
            if node not in layers:
                out.append(f"{node} has no layer (add it to LAYERS)")
        if a in layers and b in layers and layers[a] < layers[b] and (a, b) not in allowed:
            where = ", ".join(f"{i.source}:{i.line} imports {i.target}" for i in imps)
            out.append(f"upward arrow {a} (layer {layers[a]}) -> {b} (layer {layers[b]}): {where}")
    return sorted(set(out), key=out.index)


def render(
    arrows: dict[tuple[str, str], list[Import]],
    typing_only: dict[tuple[str, str], list[Import]],
    layers: dict[str, int] = LAYERS,
) -> str:
    """The graph as markdown: a layer table, an adjacency list and a mermaid diagram, and the
    `TYPE_CHECKING` imports left out of it."""
    nodes = sorted({n for arrow in arrows for n in arrow} | set(layers), key=lambda n: (-layers.get(n, 0), n))
    lines = [
        "# Import graph of `src/clipdistill`",
        "",
        "Written by `python benchmarks/import_graph.py` (read from the source with `ast`; every import",
        "counts, lazy ones inside functions too, except those under `if TYPE_CHECKING:`). Checked by",
        "tests/test_import_layers.py: no cycle between the nodes below, and no arrow from a lower layer",
        "to a higher one.",
        "",
        "| layer | nodes |",
        "|---|---|",
    ]
    for level in sorted(set(layers.values()), reverse=True):
        lines.append(f"| {level} | {', '.join(n for n in nodes if layers.get(n) == level)} |")
    lines += [
        "",
        "models sits above data and losses: teachers built or fitted on data read shards and teacher caches",
        "(`models.teacher_build`, `models.dclip_teacher`, `models.trunks`) and use loss functions",
        "(`losses._functional.contrastive_ce`, `losses.dclip.DclipMetaHead`). data names the model interface",
        "(`models.base.ClipModel`, `ImageConfig`) in annotations only, under `TYPE_CHECKING`.",
    ]
    lines += ["", "Allowed exceptions: " + ("none." if not ALLOWED else "")]
    lines += [f"- {a} -> {b}: {why}" for (a, b), why in sorted(ALLOWED.items())]
    lines += ["", "Left out: imports that only annotations need, under `if TYPE_CHECKING:` (never run):"]
    for (a, b), imps in sorted(typing_only.items()):
        names = sorted(
            {f"`{i.source[len('clipdistill.') :]}` imports `{i.target[len('clipdistill.') :]}`" for i in imps}
        )
        lines.append(f"- {a} -> {b}: " + "; ".join(names))
    if not typing_only:
        lines.append("- none")
    lines += ["", "## Arrows (node -> what it imports)", ""]
    for a in nodes:
        targets = sorted((b for (x, b) in arrows if x == a), key=lambda n: (-layers.get(n, 0), n))
        if targets:
            lines.append(f"- {a} -> " + ", ".join(targets))
        else:
            lines.append(f"- {a} -> (nothing)")
    lines += ["", "```mermaid", "graph TD"]
    lines += [f"    {a} --> {b}" for (a, b) in sorted(arrows, key=lambda e: (-layers.get(e[0], 0), e))]
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="print only; do not rewrite docs/import_graph.md"
    )
    args = parser.parse_args(argv)
    arrows = edges()
    text = render(arrows, edges(type_checking=True))
    print(text)
    found = problems(arrows)
    print("\n".join(found) if found else "check: no cycle, no upward arrow")
    if not args.check:
        DOC.write_text(text)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
