"""Time `clipdistill demo` as a new user meets it: a first run with empty caches (the teacher is built,
cached and the student distilled), then a repeat run (every stage reused).

    python benchmarks/demo_timing.py            # writes benchmarks/results/demo_timing.json

Runs the installed `clipdistill` CLI in a subprocess with $CLIPDISTILL_CACHE pointed at a new empty
folder (so no built teacher, feature cache or stored activations are reused) and a new output folder;
the datasets come from the usual data root. Wall times are the subprocess's, start to exit. Retention
is read from the demo's own table (`demo.json`): student / teacher where the teacher is >= 2x chance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "demo_timing.json"


def run_once(env: dict, out: Path) -> float:
    start = time.time()
    subprocess.run(
        [sys.executable, "-m", "clipdistill.cli.main", "demo", "--out", str(out)], env=env, check=True
    )
    return round(time.time() - start, 1)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="clipdistill-demo-") as tmp:
        env = {**os.environ, "CLIPDISTILL_CACHE": str(Path(tmp) / "cache")}
        out = Path(tmp) / "demo"
        first = run_once(env, out)
        repeat = run_once(env, out)
        demo = json.loads((out / "demo.json").read_text())
    result = {
        "first_run_s": first,
        "repeat_run_s": repeat,
        "empty_caches": "CLIPDISTILL_CACHE set to a new empty folder (teacher built, cached, student distilled)",
        "cpu_count": os.cpu_count(),
        "rows": demo["rows"],
        "training": demo["training"],
        "demo": demo["demo"],
    }
    tmp_out = OUT.with_name(f".{OUT.name}.tmp")
    tmp_out.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp_out, OUT)
    print(json.dumps({"first_run_s": first, "repeat_run_s": repeat}))


if __name__ == "__main__":
    main()
