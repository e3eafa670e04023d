"""Online vs cached teacher: epoch time of the same student on the same data, measured in one run
(issue 7 acceptance; spec section 7, MobileCLIP's "take the teacher out of the loop").

Both runs train the same student preset from the same seed for one epoch of the same samples with the
same recipe; the online run embeds every view with the teacher inside the step, the cached run reads
the embeddings that `build_cache` stored. The cache build is timed too: it is paid once, while the
online teacher is paid every epoch. Writes `benchmarks/results/teacher_cache.json` with
`{"speedup": online epoch seconds / cached epoch seconds, ...}`.

    python benchmarks/teacher_cache.py --teacher teacher:~/.cache/clipdistill/teacher --samples 512

`--samples N` copies the first N samples of `--data` into a temporary shard so a measurement takes
minutes, not an hour (the composed teacher runs at about 15 img/s on this CPU).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from clipdistill.data.loader import read_raw, resolve_shards
from clipdistill.data.shards import SkipCounter
from clipdistill.data.teacher_cache import build_cache
from clipdistill.models.factory import create_model
from clipdistill.paths import atomic_path, cache_dir
from clipdistill.train.config import config_from_dict
from clipdistill.train.engine import train

RESULTS = Path(__file__).resolve().parent / "results" / "teacher_cache.json"
RECIPE = {"clip": 1.0, "crd": 1.0, "fd": 2000.0}


def subset_shard(spec: str, n: int, folder: Path, data_root: str | None) -> tuple[str, int]:
    """The first `n` samples of `spec` as one plain tar under `folder/bench/train/0.tar`; (spec, count)."""
    shards, kind = resolve_shards(spec, data_root)
    out = folder / "bench" / "train"
    out.mkdir(parents=True, exist_ok=True)
    (folder / "bench" / "dataset_type.txt").write_text(kind if kind != "unknown" else "retrieval")
    count = 0
    with tarfile.open(out / "0.tar", "w") as tar:
        for raw in read_raw(shards, SkipCounter()):
            if count == n:
                break
            for ext, data in raw.items():
                if ext.startswith("__") or not isinstance(data, bytes):
                    continue
                info = tarfile.TarInfo(f"{raw['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    (out / "nshards.txt").write_text("1")
    return f"{folder / 'bench'}:train", count


def epoch_seconds(cfg: dict) -> dict:
    summary = train(config_from_dict(cfg))
    return {
        "seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
        "steps": summary["steps"],
        "final_loss": summary["final"].get("loss"),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--teacher",
        default=f"teacher:{cache_dir() / 'teacher'}",
        help="teacher spec (default: the demo's teacher)",
    )
    p.add_argument("--student", default="student:vit-t-32", help="student spec (preset)")
    p.add_argument("--student-text", default="teacher", choices=["own", "teacher"])
    p.add_argument("--data", default="flickr8k:train")
    p.add_argument("--data-root", default=None)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="clipdistill-bench-") as tmp:
        tmp = Path(tmp)
        data, n = subset_shard(args.data, args.samples, tmp, args.data_root)
        shards, _ = resolve_shards(data)
        torch.manual_seed(0)  # the engine seeds before building; a random-init teacher must match the cache
        teacher = create_model(args.teacher)
        start = time.time()
        build_cache(teacher, shards, tmp / "cache", augmentations=1)
        cache_seconds = time.time() - start
        del teacher
        base = {
            "student": {"spec": args.student, "text": args.student_text},
            "teacher": {"spec": args.teacher},
            "data": {
                "train": [data],
                "batch_size": args.batch_size,
                "workers": args.workers,
                "shuffle_buffer": 256,
            },
            "losses": RECIPE,
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "epochs": 1,
            "log_every": 1,
            "checkpoint_every": 10**9,
            "threads": args.threads,
        }
        online = epoch_seconds(
            {**base, "output_dir": str(tmp / "online"), "teacher": {"spec": args.teacher, "mode": "online"}}
        )
        cached = epoch_seconds(
            {
                **base,
                "output_dir": str(tmp / "cached"),
                "teacher": {"spec": args.teacher, "cache": str(tmp / "cache"), "mode": "cached"},
            }
        )
    result = {
        "speedup": round(online["seconds"] / max(cached["seconds"], 1e-9), 2),
        "online": online,
        "cached": cached,
        "cache_build_seconds": round(cache_seconds, 1),
        "samples": n,
        "teacher": args.teacher,
        "student": args.student,
        "student_text": args.student_text,
        "recipe": RECIPE,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = atomic_path(args.out)
    tmp_file.write_text(json.dumps(result, indent=2))
    os.replace(tmp_file, args.out)
    print(json.dumps({k: result[k] for k in ("speedup", "cache_build_seconds", "samples")}))
    print(
        f"online epoch {online['seconds']:.1f} s, cached epoch {cached['seconds']:.1f} s -> speedup {result['speedup']}x"
    )
    return result


if __name__ == "__main__":
    main()
