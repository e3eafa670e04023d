"""The command line: one subcommand per job (`run`, `list`, `render`, `probe`, `recheck`, `recheck-tracks`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from . import __doc__ as USAGE
from . import layout
from .equivalence import pair_tracks, recheck, record_equivalence, teacher_metrics
from .grid import GRID, METHODS, SETTINGS, TRACKS, Budget, Cell
from .report import render
from .runner import prepare, probe_cell, run_cell
from .stats import close_cells, scores

log = logging.getLogger("methods")


def build_parser() -> argparse.ArgumentParser:
    budget = argparse.ArgumentParser(add_help=False)
    budget.add_argument(
        "--steps",
        type=int,
        default=Budget.steps,
        help="training steps per cell (every cell of a table shares them)",
    )
    budget.add_argument("--student", default=Budget.student)
    budget.add_argument(
        "--cells",
        type=Path,
        default=None,
        help="folder of finished cell records of the default budget "
        "(default: benchmarks/results/methods; other budgets: benchmarks/results/budgets/<student>-<steps>)",
    )
    teacher = argparse.ArgumentParser(add_help=False)
    teacher.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="built teacher folder (default: the cache dir's, built if missing)",
    )
    teacher.add_argument("--data-root", default=None)
    grid = argparse.ArgumentParser(add_help=False)
    variants = ", ".join(m for m in METHODS if m not in GRID)
    grid.add_argument(
        "--methods",
        nargs="+",
        default=GRID,
        choices=list(METHODS),
        help=f"default: the grid; our variants: {variants} (with dclip among them, DCLIP's extras are built in the caches)",
    )
    grid.add_argument("--tracks", nargs="+", default=list(TRACKS), choices=list(TRACKS))
    selection = argparse.ArgumentParser(add_help=False)
    selection.add_argument("--settings", nargs="+", default=["image"], choices=list(SETTINGS))
    selection.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    selection.add_argument(
        "--close",
        action="store_true",
        help="instead of the grid: seeds 3 and 4 of ours and the two best published methods of every "
        "(track, setting) whose 3-seed margin is undecided (see stats.close_cells)",
    )
    selection.add_argument(
        "--seed-major", action="store_true", help="run every method at seed 0 first, then seed 1, ..."
    )

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.methods",
        description=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cells = [grid, selection, budget]
    sub.add_parser(
        "run", parents=[*cells, teacher], help="train and evaluate the cells not finished yet, then render"
    )
    sub.add_parser("list", parents=cells, help="print the cells and whether each is done")
    sub.add_parser("render", parents=[budget], help="only aggregate the finished cells")
    sub.add_parser(
        "probe", parents=[*cells, teacher], help="add the CIFAR-10 linear probe to the finished cells"
    )
    check = sub.add_parser(
        "recheck",
        parents=[grid, budget, teacher],
        help="re-run a finished cell with the current teacher and record in benchmarks/results/teacher_equivalence.json "
        "whether it reproduces within EQUIV_TOL points",
    )
    check.add_argument("cell", metavar="CELL", help="a finished cell, e.g. relational_tau10-A-both-s0")
    sub.add_parser(
        "recheck-tracks",
        parents=[budget],
        help="record the same evidence from finished cells: the methods that use no caption-less image, "
        "tracks A and b2n, where the two tracks' cells were distilled from different teachers",
    )
    return parser


def select(args: argparse.Namespace, budget: Budget, folder: Path) -> list[Cell]:
    """The cells a `run`, `list` or `probe` works on, in the order it takes them."""
    cells = [
        Cell(m, t, s, seed)
        for t in args.tracks
        for s in args.settings
        for m in args.methods
        for seed in args.seeds
    ]
    if args.close:
        cells = [
            c
            for c in close_cells(layout.load_cells(folder, budget))
            if c.track in args.tracks and c.setting in args.settings
        ]
    if args.seed_major:
        cells.sort(key=lambda c: (c.seed, args.tracks.index(c.track), c.setting))
    return cells


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    budget = Budget(student=args.student, steps=args.steps)
    folder = layout.cells_dir(budget, args.cells)
    torch.set_num_threads(budget.threads)
    return COMMANDS[args.command](args, budget, folder)


def list_cells(args: argparse.Namespace, budget: Budget, folder: Path) -> int:
    for c in select(args, budget, folder):
        print(f"{'done ' if (folder / f'{c.name}.json').exists() else 'todo '} {c.name}")
    return 0


def render_only(args: argparse.Namespace, budget: Budget, folder: Path) -> int:
    """The finished cells and the recorded teacher figures are all it needs."""
    render(budget, cells=args.cells)
    print(layout.report_path(budget).read_text())
    return 0


def recheck_tracks(args: argparse.Namespace, budget: Budget, folder: Path) -> int:
    found = pair_tracks(layout.load_cells(folder, budget))
    record_equivalence(found)
    print(json.dumps(found, indent=1))
    return 0 if found and all(e["equivalent"] for e in found.values()) else 3


def _prepare(args: argparse.Namespace) -> tuple[Path, dict]:
    """The teacher folder and the shared preparation (`runner.prepare`) of the tracks in `args`."""
    from clipdistill.paths import cache_dir

    teacher_dir = (args.teacher or cache_dir() / "teacher").expanduser()
    return teacher_dir, prepare(teacher_dir, args.data_root, args.tracks, dclip="dclip" in args.methods)


def recheck_cell(args: argparse.Namespace, budget: Budget, folder: Path) -> int:
    teacher_dir, prep = _prepare(args)
    entry = recheck(args.cell, budget, teacher_dir, prep, args.data_root, cells=args.cells)
    print(json.dumps(entry, indent=1))
    return 0 if entry["equivalent"] else 3


def run_cells(args: argparse.Namespace, budget: Budget, folder: Path) -> int:
    """Train and evaluate every selected cell not finished yet (rendering after each), then render."""
    cells = select(args, budget, folder)
    teacher_dir, prep = _prepare(args)
    t_metrics = teacher_metrics(prep, args.data_root)
    for c in cells:
        if (folder / f"{c.name}.json").exists():
            continue
        log.info("cell %s", c.name)
        record = run_cell(c, budget, teacher_dir, prep, args.data_root, folder=folder)
        log.info(
            "cell %s done: score %.2f (train %.0f s)",
            c.name,
            scores(record["metrics"])["score"],
            record["train_seconds"],
        )
        render(budget, t_metrics, cells=args.cells)
    return _final_render(args, budget, t_metrics)


def probe_cells(args: argparse.Namespace, budget: Budget, folder: Path) -> int:
    """Add the linear probe to every selected finished cell that lacks it, then render."""
    cells = select(args, budget, folder)
    _, prep = _prepare(args)
    t_metrics = teacher_metrics(prep, args.data_root)
    for c in cells:
        path = folder / f"{c.name}.json"
        if path.exists() and probe_cell(path, prep["teacher"], args.data_root):
            log.info("cell %s: linear probe done", c.name)
    return _final_render(args, budget, t_metrics)


def _final_render(args: argparse.Namespace, budget: Budget, t_metrics: dict) -> int:
    out = render(budget, t_metrics, cells=args.cells)
    print(layout.report_path(budget).read_text())
    return 0 if out else 1


COMMANDS: dict[str, Callable[[argparse.Namespace, Budget, Path], int]] = {
    "run": run_cells,
    "list": list_cells,
    "render": render_only,
    "probe": probe_cells,
    "recheck": recheck_cell,
    "recheck-tracks": recheck_tracks,
}
