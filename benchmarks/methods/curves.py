"""Learning curves of the pretrained-student regime (issue 24): the headline score of a method's cell,
evaluated along its training (`train_suffix`'s `on_step` hook), to show whether the regime's budget
separates the no-teacher baseline from the methods, and what budget the baseline would need.

    python -m benchmarks.methods.pretrained --curves no_teacher tinyclip [--curve-epochs 10 30]

Each curve is one training run of `epochs` epochs with its own warmup and cosine schedule, evaluated at
`POINTS` evenly spaced steps on the four headline figures (the same stored evaluation images as the cells).
A point is therefore the score of a student still training, not of a shorter run's end; the last point is
the cell's own score at that budget. Curves land in benchmarks/results/methods_pretrained/curves/ (one JSON
each, rerunning skips them) and `plot` draws them into curves.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

POINTS = 10  # evaluations per curve, besides step 0 (after the head's closed-form fit)
HEADLINE_SETS = ("cifar10", "cifar100-916", "imagenet-1k-sample", "flickr8k")  # the score's figures


def curve_path(folder: Path, name: str, epochs: float) -> Path:
    return folder / f"{name}-e{epochs:g}.json"


def run_curve(method: str, track: str, seed: int, epochs: float, folder: Path) -> dict:
    """Train `method`'s cell of (`track`, `seed`) for `epochs` epochs and score it at POINTS + 1 steps."""
    import students_data as D

    from clipdistill.models.freeze import split_image_tower
    from clipdistill.train.prefix import planned_steps, train_suffix

    from . import pretrained as P

    out = curve_path(folder, P.cell_name(method, track, seed), epochs)
    if out.exists():
        return json.loads(out.read_text())
    cfg, losses, _, paired, unpaired, _ = P.cell_setup(method, track, seed, epochs)
    steps = planned_steps(cfg, len(paired))
    cfg.curve_every = max(1, steps // POINTS)
    model = P._model(seed)
    _, suffix = split_image_tower(model, P.REGIME.freeze)
    teacher = P.teacher_metrics()
    points = []

    def score(step: int, trained) -> None:
        metrics = {
            name: D.metrics(name, emb, acts)
            for name, emb, acts in D.eval_embeddings(
                trained, model, P.REGIME.prefix_key, P.REGIME.freeze, only=HEADLINE_SETS
            )
        }
        head = P.headline_score(metrics, teacher)
        points.append({"step": step, "epoch": round(step * epochs / steps, 3), **head})
        print(f"{method} step {step}/{steps}: score {head['score']:.4f}", flush=True)

    t0 = time.time()
    log = train_suffix(
        suffix, paired, unpaired, cfg, teacher_scale=float(D.teacher().logit_scale().detach()), on_step=score
    )
    result = {
        "cell": {"method": method, "track": track, "setting": P.REGIME.setting, "seed": seed},
        "regime": {**asdict(P.REGIME), "epochs": epochs},
        "losses": losses,
        "head_init": cfg.head_init,
        "steps": steps,
        "train": log,
        "minutes_with_evaluations": round((time.time() - t0) / 60, 2),
        "points": points,
    }
    D._write(out, result)
    return result


def plot(folder: Path, png: Path) -> None:
    """Every curve in `folder` as headline score (%) against epochs, one line per (method, budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not curves:
        raise SystemExit(
            f"no curves in {folder}: run `python -m benchmarks.methods.pretrained --curves` first"
        )
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for c in curves:
        x = [p["epoch"] for p in c["points"]]
        y = [100 * p["score"] for p in c["points"]]
        ax.plot(x, y, marker="o", ms=3, label=f"{c['cell']['method']} ({c['regime']['epochs']:g} epochs)")
    ax.axhline(80, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("epoch (Flickr8k train pairs)")
    ax.set_ylabel("headline score: mean retention (%)")
    ax.set_title("Track B, setting image, seed 0: score along training", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(png)
