"""Side-by-side benchmark of every distillation method on the offline teacher (issue 6; spec section 11).

Run from the repository root:

    python -m benchmarks.methods run                  # run (or resume) the default grid, then render
    python -m benchmarks.methods run --methods relational clip_kd --seeds 0 1 2
    python -m benchmarks.methods list                 # every cell of the grid and whether it is done
    python -m benchmarks.methods render               # tables and plot from the finished cells only
    python -m benchmarks.methods probe --seeds 0      # add the CIFAR-10 linear probe to finished cells
    python -m benchmarks.methods recheck CELL         # a rebuilt teacher against the recorded one
    python -m benchmarks.methods recheck-tracks       # the same evidence from finished cells of tracks A, b2n

A cell is (method, track, student setting, seed). Every cell trains the same student preset for the
same steps, batch, image size and views (the teacher cache's centre view of each image, so the teacher
runs once per image for the whole grid) from the same seed; only the loss recipe changes. The recipes
are the ones users run, read from `configs/*.yaml`.

Tracks: `A` distils on Flickr8k train (images and captions). Settings: `image` trains the preset's
image tower with the teacher's frozen text tower; `both` trains the preset's image and text towers.

A finished cell writes `benchmarks/results/methods/<cell>.json` (metrics, wall time, config) and is
never run again; an interrupted cell resumes from its checkpoint in `runs/methods/<cell>/`. So the grid
can be spread over sessions and machines. `render` aggregates every finished cell into
`benchmarks/results/methods.{json,csv,md,png}` and `docs/benchmark.md`: mean and std over seeds per
metric, retention % of the teacher, and `noise_relational_margin` (ours against the best published method
on the benchmark score = mean of the zero-shot top-1 mean and the retrieval recall mean, paired by seed).
That regime's students keep 16-20% of the teacher; `pretrained` and `pretrained_report` are the regime
where they keep most of it (issue 24), and own methods.json's `headline`, `regimes`, `tracks` and
`relational_margin`.
Evaluation: zero-shot top-1 on cifar10 (every 5th test image), imagenet-1k-sample (top-1 and top-5),
dtd-10, mnist (every 10th); Flickr8k test retrieval R@1/5/10 both ways; plus Flickr8k dev retrieval,
the only figure used to select options of our method.

Modules: `grid` (the grid as data), `layout` (where records live), `runner` (preparation and one cell),
`teachers` and `equivalence` (which teacher a cell was distilled from; rebuilt teachers measured
interchangeable), `stats` (scores, margins, selection), `tables` and `report` (markdown, files, plot),
`cli` (the subcommands). The names below are re-exported for reading; a test that replaces a path or a
function patches the module that defines it (e.g. `layout.RESULTS`, `equivalence.evaluate`).
"""

from .equivalence import (
    compare_records,
    image_free,
    pair_tracks,
    recheck,
    record_equivalence,
    teacher_metrics,
)
from .grid import (
    B2N_KEY,
    EQUIV_TOL,
    GRID,
    LEGACY_TEACHER,
    METHODS,
    PROBE_KEY,
    SETTINGS,
    TRACKS,
    VARIANTS,
    Budget,
    Cell,
    budget_name,
)
from .layout import cells_dir, load_cells, report_path, write_json
from .report import render, render_budget
from .runner import prepare, recipe, recipe_groups, run_cell, run_config
from .stats import aggregate, budget_study, close_cells, relational_margin, scores, select_relational
from .tables import budget_table, markdown, summary_table
from .teachers import (
    alias_chain,
    cell_teacher,
    load_aliases,
    load_teachers,
    one_teacher,
    recorded_teacher,
    teacher_figures,
)

__all__ = [
    "B2N_KEY",
    "EQUIV_TOL",
    "GRID",
    "LEGACY_TEACHER",
    "METHODS",
    "PROBE_KEY",
    "SETTINGS",
    "TRACKS",
    "VARIANTS",
    "Budget",
    "Cell",
    "aggregate",
    "alias_chain",
    "budget_name",
    "budget_study",
    "budget_table",
    "cell_teacher",
    "cells_dir",
    "close_cells",
    "compare_records",
    "image_free",
    "load_aliases",
    "load_cells",
    "load_teachers",
    "markdown",
    "one_teacher",
    "pair_tracks",
    "prepare",
    "recheck",
    "recipe",
    "recipe_groups",
    "record_equivalence",
    "recorded_teacher",
    "relational_margin",
    "render",
    "render_budget",
    "report_path",
    "run_cell",
    "run_config",
    "scores",
    "select_relational",
    "summary_table",
    "teacher_figures",
    "teacher_metrics",
    "write_json",
]
