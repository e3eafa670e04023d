"""The offline teacher under the seeds' evaluation protocols (issue 9): base-to-novel on CIFAR-10 and
imagenet-1k-sample, and the CIFAR-10 linear probe.

    python benchmarks/teacher_protocols.py [--teacher DIR]

Same as `clipdistill eval --model teacher:DIR --task base2novel|linear_probe ...` with the subsets below;
writes one CLIP_benchmark-style record per run to benchmarks/results/teacher/. CIFAR-10 test uses every
5th image (2,000, the zero-shot subset); the linear probe is fitted on all 20,000 train images (C chosen
on a held-out 20%). Teacher tower features come from its feature cache, so a repeat run takes seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clipdistill.eval.runner import evaluate
from clipdistill.models.composed import load_teacher
from clipdistill.paths import cache_dir

OUT = Path(__file__).parent / "results" / "teacher"
RUNS = [  # (dataset, task, every, train_every)
    ("cifar10", "base2novel", 5, None),
    ("imagenet-1k-sample", "base2novel", 1, None),
    ("cifar10", "linear_probe", 5, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=cache_dir() / "teacher")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    OUT.mkdir(parents=True, exist_ok=True)
    for dataset, task, every, train_every in RUNS:
        record = evaluate(
            teacher,
            dataset,
            "test",
            task,
            data_root=args.data_root,
            every=every,
            train_every=train_every,
            output=OUT / f"{task}_{dataset}.json",
        )
        print(
            dataset,
            task,
            {k: round(100 * v, 1) for k, v in record["metrics"].items() if isinstance(v, float)},
        )


if __name__ == "__main__":
    main()
