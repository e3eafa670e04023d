"""Benchmark of `clipdistill balance` (spec section 4.1) on synthetic embeddings with planted near-duplicates.

Data: N x 512 float32 unit vectors. Background rows are anisotropic Gaussians (variance of axis i
proportional to 1/i, like the decaying spectrum of real CLIP embeddings). A fifth of the rows form
planted groups (sizes 2-32, geometric): each group is one background vector plus per-member noise with
the same spectrum and a per-group scale in [0.02, 0.16], so within-group distances straddle beta = 0.2.
Groups are scattered within blocks of 100k rows, so the smaller N (prefixes of the same array) hold
whole groups and the same fraction of duplicates.

Recall = fraction of planted pairs (same group, exact distance < beta) whose two members end in the
same output group; edge recall = fraction found directly as neighbour pairs. Each size runs in its own
process, so peak memory is per run: `peak_mb` is the peak resident set (VmHWM; it includes the pages
of the memory-mapped input, about N x 2 KB, which are reclaimable page cache), `peak_anon_mb` the
peak of anonymous memory (sampled every 0.1 s). The exact `flat` search runs on the first `--exact-subset`
rows for the agreement figures.

    python benchmarks/balance.py                       # 100k, 300k, 1M + exact on 100k
    python benchmarks/balance.py --sizes 100000 --exact-subset 20000   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def generate(workdir: Path, n: int, dim: int, seed: int = 0, dup_fraction: float = 0.2, block: int = 100_000):
    """Write the embeddings (.npy) and planted group ids (-1: none). Groups live inside blocks of
    `block` rows, so every prefix of a multiple of `block` rows holds whole groups."""
    emb_path, groups_path = workdir / f"emb_{n}x{dim}.npy", workdir / f"groups_{n}.npy"
    if emb_path.exists() and groups_path.exists():
        return emb_path, groups_path
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.arange(1, dim + 1)) ** 0.5
    scale = (scale / np.linalg.norm(scale)).astype(np.float32)  # a draw has expected norm 1
    tmp = emb_path.with_suffix(".tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, 65536):
        z = rng.standard_normal((min(65536, n - s), dim), dtype=np.float32) * scale
        arr[s : s + len(z)] = z / np.linalg.norm(z, axis=1, keepdims=True)
    groups = np.full(n, -1, dtype=np.int64)
    next_id = 0
    for b0 in range(0, n, block):
        size_b = min(block, n - b0)
        sizes = np.minimum(32, 1 + rng.geometric(0.4, size=size_b))
        sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), dup_fraction * size_b)) + 1]
        rows = b0 + rng.permutation(size_b)[: sizes.sum()]
        groups[rows] = next_id + np.repeat(np.arange(len(sizes)), sizes)
        next_id += len(sizes)
        sigma = rng.uniform(0.02, 0.16, size=len(sizes)).astype(np.float32)
        first = rows[np.r_[0, np.cumsum(sizes)[:-1]]]
        base = np.repeat(np.asarray(arr[first]), sizes, axis=0)  # each group grows around its first row
        noise = rng.standard_normal(base.shape, dtype=np.float32) * scale * np.repeat(sigma, sizes)[:, None]
        x = base + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        order = np.argsort(rows)
        arr[rows[order]] = x[order]
    arr.flush()
    del arr
    os.replace(tmp, emb_path)
    np.save(groups_path, groups)
    return emb_path, groups_path


def planted_pairs(groups: np.ndarray, emb, beta: float) -> tuple[np.ndarray, np.ndarray]:
    from clipdistill.curate.knn import pair_distances

    rows = np.flatnonzero(groups >= 0)
    rows = rows[np.argsort(groups[rows], kind="stable")]
    g = groups[rows]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1, len(rows)]
    ii, jj = [], []
    for a, b in zip(starts[:-1], starts[1:]):
        m = rows[a:b]
        if len(m) > 1:
            x, y = np.triu_indices(len(m), 1)
            ii.append(m[x])
            jj.append(m[y])
    i, j = np.concatenate(ii), np.concatenate(jj)
    d = pair_distances(emb, i, j)
    return i[d < beta], j[d < beta]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _AnonPeak(threading.Thread):
    """Samples RssAnon from /proc/self/status; `peak_mb` is the largest value seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mb, self.running = 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))
            time.sleep(0.1)


def worker(args: argparse.Namespace) -> None:
    from clipdistill.curate.balance import BalanceConfig, balance
    from clipdistill.curate.io import Embeddings
    from clipdistill.curate.knn import SearchConfig

    sampler = _AnonPeak()
    sampler.start()
    arr = np.load(args.emb, mmap_mode="r")[: args.n]
    emb = Embeddings(arr)
    cfg = BalanceConfig(beta=args.beta, plots=False, search=SearchConfig(index=args.index, k=args.k))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = balance(emb, cfg, Path(args.workdir) / f"out_{args.index}_{args.n}")
    seconds = time.perf_counter() - start
    sampler.running = False
    peak_mb = _status_mb("VmHWM")  # not ru_maxrss: Linux carries the parent's peak across exec
    groups = np.load(args.groups)[: args.n]
    pi, pj = planted_pairs(groups, emb, args.beta)
    edges = set((result.pairs.i * args.n + result.pairs.j).tolist())
    found_edge = np.array([(a * args.n + b) in edges for a, b in zip(pi, pj)])
    same = result.labels[pi] == result.labels[pj]
    np.savez(
        Path(args.workdir) / f"result_{args.index}_{args.n}.npz",
        i=result.pairs.i,
        j=result.pairs.j,
        d=result.pairs.d,
        keep=result.keep,
    )
    search = result.stats["search"]
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "recall": float(same.mean()),
                "edge_recall": float(found_edge.mean()),
                "peak_mb": round(peak_mb, 1),
                "peak_anon_mb": round(sampler.peak_mb, 1),
                "planted_pairs": len(pi),
                "pairs_found": len(result.pairs),
                "kept_fraction": result.stats["kept_fraction"],
                "index": search["index"],
                "nprobe": search.get("nprobe"),
                "nlist": search.get("nlist"),
                "pca": search["pca"],
                "sample_recall": search.get("sample_recall"),
                "stage_seconds": result.stats["seconds"],
                "load_average_before": round(load, 2),
                "load_average_after": round(os.getloadavg()[0], 2),
            }
        )
    )


def _run_worker(args: argparse.Namespace, n: int, index: str, emb: Path, groups: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--n",
        str(n),
        "--index",
        index,
        "--emb",
        str(emb),
        "--groups",
        str(groups),
        "--workdir",
        str(args.workdir),
        "--beta",
        str(args.beta),
        "--k",
        str(args.k),
    ]
    print(f"running N={n} index={index} ...", flush=True)
    # Passive OpenMP waiting: on a shared, oversubscribed CPU spinning threads cost 2-3x (measured).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker N={n} {index} failed")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(res), flush=True)
    return res


def agreement(workdir: Path, n: int) -> dict:
    a, e = (np.load(workdir / f"result_{kind}_{n}.npz") for kind in ("ivf", "flat"))
    pa, pe = set((a["i"] * n + a["j"]).tolist()), set((e["i"] * n + e["j"]).tolist())
    return {
        "exact_pairs": len(pe),
        "approx_pairs": len(pa),
        "pairs_recall_vs_exact": len(pa & pe) / max(1, len(pe)),
        "pairs_precision_vs_exact": len(pa & pe) / max(1, len(pa)),
        "keep_decisions_identical": float(np.mean(a["keep"] == e["keep"])),
        "kept_fraction_exact": float(e["keep"].mean()),
        "kept_fraction_approx": float(a["keep"].mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,300000,1000000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--beta", type=float, default=0.2)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--exact-subset", type=int, default=100_000)
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_balance")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "balance.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index", default="ivf", help=argparse.SUPPRESS)
    p.add_argument("--emb", help=argparse.SUPPRESS)
    p.add_argument("--groups", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    emb, groups = generate(args.workdir, max(sizes), args.dim)
    results: dict[str, dict] = {}
    for n in sizes:
        results[str(n)] = _run_worker(args, n, "ivf", emb, groups)
    if args.exact_subset:
        n = args.exact_subset
        if str(n) not in results:
            results[str(n)] = _run_worker(args, n, "ivf", emb, groups)
        exact = _run_worker(args, n, "flat", emb, groups)
        results[str(n)]["exact"] = {
            k: exact[k] for k in ("seconds", "recall", "peak_mb", "pairs_found", "kept_fraction")
        }
        results[str(n)]["agreement_with_exact"] = agreement(args.workdir, n)
    base = results[str(sizes[0])]["seconds"]
    for n in sizes:
        results[str(n)][f"seconds_ratio_to_{sizes[0]}"] = round(results[str(n)]["seconds"] / base, 2)
        results[str(n)]["setup"] = {"dim": args.dim, "beta": args.beta, "k": args.k, "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
