"""PNG plots for curation (docs/methods.md sections 4.1-4.2): group / cluster size distribution (as the CLIP-CID
paper shows for its clusters) and kept fraction vs beta. Uses matplotlib's object API, so no global
backend state is touched."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from clipdistill.paths import atomic_path


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_size_distribution(histogram: Mapping[str | int, int], path: str | Path, what: str = "group") -> Path:
    """Number of groups (or clusters) of each size, log-log. `histogram` maps size -> count."""
    sizes = sorted((int(s), int(c)) for s, c in histogram.items() if int(c) > 0)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.plot([s for s, _ in sizes], [c for _, c in sizes], "o", markersize=3)
    if sizes:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"{what} size (samples)")
    ax.set_ylabel(f"number of {what}s")
    ax.set_title(f"{what} size distribution ({sum(c for _, c in sizes)} {what}s)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, Path(path))


def plot_kept_vs_beta(
    curve: Sequence[Mapping[str, float]],
    path: str | Path,
    beta: float | None = None,
    target: float | None = None,
) -> Path:
    """Kept fraction against beta; marks the chosen beta and the target fraction when given."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.plot([r["beta"] for r in curve], [r["kept_fraction"] for r in curve], "-o", markersize=3)
    if beta is not None:
        ax.axvline(beta, color="tab:red", linestyle="--", label=f"beta = {beta:.4g}")
    if target is not None:
        ax.axhline(target, color="tab:green", linestyle=":", label=f"target {target:.3g}")
    if beta is not None or target is not None:
        ax.legend()
    ax.set_xlabel("beta (Euclidean distance on normalised embeddings)")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    return _save(fig, Path(path))
