"""Regenerate benchmarks/results/latency.{json,md}: CPU latency of every student preset (and optionally
the offline teacher) in PyTorch and ONNX Runtime at batch 1 and 64, threads fixed.

    python benchmarks/latency.py                    # every student preset, 2 threads
    python benchmarks/latency.py --teacher DIR      # plus the composed teacher (teacher:DIR)

It runs `clipdistill bench-latency` with modest repetitions (10 timed runs at batch 1, 3 at batch 64),
so numbers on a shared CPU are indicative; rerun on an idle machine for a publishable table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipdistill.cli.main import main as clipdistill

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="folder of a built teacher, timed as teacher:DIR")
    parser.add_argument("--model", action="append", default=[], help="extra model specs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--repeats-large", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = [f"teacher:{args.teacher}"] if args.teacher else []
    models += args.model
    cmd = ["bench-latency", "--students", "--threads", str(args.threads), "--batch-sizes", "1", "64",
           "--repeats", str(args.repeats), "--repeats-large", str(args.repeats_large),
           "--json", str(args.out / "latency.json"), "--markdown", str(args.out / "latency.md")]
    for spec in models:
        cmd += ["--model", spec]
    return clipdistill(cmd)


if __name__ == "__main__":
    sys.exit(main())
