"""Kept fraction vs beta of CLIP-CID semantic balance on the offline teacher's image embeddings of
Flickr8k train + CIFAR-10 train (issue 4's shared-data table).

    python benchmarks/balance_shared.py --teacher runs/teacher

Teacher image embeddings (normalised, centre crop) go through the teacher's feature cache, so only
images never seen before run through the tower. Writes benchmarks/results/balance_shared.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipdistill.curate.balance import BalanceConfig, balance
from clipdistill.curate.io import Embeddings
from clipdistill.data.shards import dataset_info, iter_samples
from clipdistill.models.composed import load_teacher
from clipdistill.models.teacher_build import pooled_features

RESULTS = Path(__file__).parent / "results"
SETS = [("flickr8k", "train"), ("cifar10", "train")]
BETAS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/teacher")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    keys, parts = [], []
    for name, split in SETS:
        info = dataset_info(name)
        samples, pooled = pooled_features(teacher, iter_samples(info.shards(split)), desc=f"{name}/{split}")
        with torch.no_grad():
            parts.append(F.normalize(teacher.image_head(pooled), dim=-1).numpy().astype(np.float32))
        keys += [f"{name}/{s.key}" for s in samples]
    emb = np.concatenate(parts)
    rows = {}
    for source, sel in [
        ("flickr8k+cifar10", slice(None)),
        ("flickr8k", slice(0, len(parts[0]))),
        ("cifar10", slice(len(parts[0]), None)),
    ]:
        e = Embeddings(array=np.ascontiguousarray(emb[sel]), keys=keys[sel])
        result = balance(e, BalanceConfig(sweep=tuple(BETAS), plots=False))
        rows[source] = {"n": len(e), "sweep": result.stats["sweep"]}
    out = {"teacher": args.teacher, "betas": BETAS, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / ".balance_shared.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, RESULTS / "balance_shared.json")
    lines = [
        "| beta | " + " | ".join(f"{k} (n={v['n']})" for k, v in rows.items()) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for i, beta in enumerate(BETAS):
        lines.append(
            f"| {beta} | " + " | ".join(f"{v['sweep'][i]['kept_fraction']:.3f}" for v in rows.values()) + " |"
        )
    (RESULTS / "balance_shared.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
