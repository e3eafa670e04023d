"""Regenerate benchmarks/results/latency.{json,md}: CPU latency of every student preset (and optionally
the offline teacher) in PyTorch and ONNX Runtime at batch 1 and 64, threads fixed.

    python benchmarks/latency.py                    # every student preset, 2 threads
    python benchmarks/latency.py --teacher DIR      # plus the composed teacher (teacher:DIR)

It runs `clipdistill bench-latency` with modest repetitions (10 timed runs at batch 1, 3 at batch 64).
Cells read "median (min)" in ms. Threads wait passively (OMP_WAIT_POLICY=PASSIVE, ONNX Runtime without
spinning): on a CPU shared with other jobs spinning threads inflate medians 10-50x. Numbers from a busy
machine are still indicative only; rerun on an idle one for a publishable table.
`--render` rewrites latency.md from latency.json without timing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning (see clipdistill.models.latency).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from clipdistill.cli.main import main as clipdistill  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default=None, help="folder of a built teacher, timed as teacher:DIR")
    parser.add_argument("--model", action="append", default=[], help="extra model specs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--repeats-large", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="only rewrite latency.md from latency.json")
    args = parser.parse_args(argv)
    if args.render:
        from clipdistill.models.latency import latency_table, save_text

        rows = json.loads((args.out / "latency.json").read_text())["rows"]
        save_text(args.out / "latency.md", latency_table(rows))
        return 0
    models = [f"teacher:{args.teacher}"] if args.teacher else []
    models += args.model
    cmd = [
        "bench-latency",
        "--students",
        "--threads",
        str(args.threads),
        "--batch-sizes",
        "1",
        "64",
        "--repeats",
        str(args.repeats),
        "--repeats-large",
        str(args.repeats_large),
        "--json",
        str(args.out / "latency.json"),
        "--markdown",
        str(args.out / "latency.md"),
    ]
    for spec in models:
        cmd += ["--model", spec]
    return clipdistill(cmd)


if __name__ == "__main__":
    sys.exit(main())
