"""Build the offline teacher on Flickr8k train (early stopping on dev) and evaluate it on the suite.

    python benchmarks/teacher.py [--out runs/teacher] [--every-large 5]

Writes benchmarks/results/teacher.json and teacher.md (the README's teacher table). The image tower's
features go through the content-addressed feature cache, so a re-run computes nothing twice.
CIFAR-10 and MNIST tests are subsampled (every 5th image, 2,000 each) as in spec section 9's floor.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from clipdistill.eval.runner import evaluate
from clipdistill.models.composed import load_teacher
from clipdistill.models.teacher_build import TeacherBuildConfig, build_teacher, check_image_tower

RESULTS = Path(__file__).parent / "results"
SUITE = [("cifar10", "large"), ("imagenet-1k-sample", "small"), ("dtd-10", "small"), ("mnist", "large")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/teacher")
    parser.add_argument("--every-large", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-unlocked", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    build = None
    if not (out / "teacher.json").exists():
        build = build_teacher(TeacherBuildConfig(text_unlocked=args.text_unlocked), out)
    teacher = load_teacher(out)
    teacher.spec = f"teacher:{out}"
    info = json.loads((out / "teacher.json").read_text())
    records = {}
    start = time.time()
    for name, size in SUITE:
        every = args.every_large if size == "large" else 1
        records[name] = evaluate(teacher, name, "test", every=every)
    records["flickr8k"] = evaluate(teacher, "flickr8k", "test")
    result = {
        "teacher": str(out),
        "fingerprint": info["fingerprint"],
        "build": build or {k: info[k] for k in ("build", "best_epoch", "seconds")},
        "imagenet_classifier_check": check_image_tower(teacher),
        "records": records,
        "eval_seconds": round(time.time() - start, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / ".teacher.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, RESULTS / "teacher.json")
    (RESULTS / "teacher.md").write_text(table(result) + "\n")
    print(table(result))


def table(result: dict) -> str:
    r = result["records"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    f = r["flickr8k"]["metrics"]
    rows = [
        "| metric | offline teacher |",
        "|---|---|",
        f"| CIFAR-10 zero-shot top-1 (every 5th test image) | {pct(r['cifar10']['metrics']['acc1'])} |",
        f"| ImageNet-1k-sample top-1 / top-5 | {pct(r['imagenet-1k-sample']['metrics']['acc1'])} / {pct(r['imagenet-1k-sample']['metrics']['acc5'])} |",
        f"| DTD-10 top-1 (47-way) | {pct(r['dtd-10']['metrics']['acc1'])} |",
        f"| MNIST top-1 (every 5th test image) | {pct(r['mnist']['metrics']['acc1'])} |",
        "| Flickr8k test image->text R@1 / R@5 / R@10 | "
        + " / ".join(pct(f[f"text_retrieval_recall@{k}"]) for k in (1, 5, 10))
        + " |",
        "| Flickr8k test text->image R@1 / R@5 / R@10 | "
        + " / ".join(pct(f[f"image_retrieval_recall@{k}"]) for k in (1, 5, 10))
        + " |",
        f"| image tower's own ImageNet classifier, top-1 / top-5 | {pct(result['imagenet_classifier_check']['top1'])} / {pct(result['imagenet_classifier_check']['top5'])} |",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
