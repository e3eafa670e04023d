"""Spherical k-means pseudo-labels for CLIP-CID's cluster-level distillation (docs/methods.md section 4.2).

The teacher image embeddings are L2-normalised, clustered into K clusters with faiss k-means
(`spherical=True`: centres re-normalised after every iteration), and every sample gets the label of
its nearest centre (largest cosine). Training uses at most `max_points_per_centroid * K` rows (a
seeded random sample); labelling streams over all N rows.

Outputs in `out_dir`: `centres.npy` (K x D float32, unit rows: the `W` of section 4.2),
`labels.npz` (`keys`: N strings, `labels`: N int64, row order of the input), `stats.json` and
`cluster_sizes.png`. `load_pseudo_labels(out_dir)` reads them back for the `cluster` loss term.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from clipdistill.curate.io import Embeddings, normalise, save_npy_atomic, save_npz_atomic, write_json_atomic
from clipdistill.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ClusterConfig:
    k: int  # number of clusters (from the recipe's config: e.g. 100-1000 for Flickr8k)
    niter: int = 20
    seed: int = 0
    max_points_per_centroid: int = 256
    nredo: int = 1
    chunk: int = 65536
    plots: bool = True


@dataclass
class ClusterResult:
    centres: np.ndarray  # K x D, unit rows
    labels: np.ndarray  # N
    stats: dict


def spherical_kmeans(emb: Embeddings, cfg: ClusterConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres K x D unit rows, labels N, cosine of each row to its centre)."""
    n = len(emb)
    if not 1 <= cfg.k <= n:
        raise UserError(f"k = {cfg.k} clusters for {n} samples; choose 1 <= k <= {n}")
    rng = np.random.default_rng(cfg.seed)
    n_train = min(n, cfg.k * cfg.max_points_per_centroid)
    ids = np.arange(n) if n_train == n else np.sort(rng.choice(n, n_train, replace=False))
    x = emb.rows(ids)
    km = faiss.Kmeans(
        emb.dim,
        cfg.k,
        niter=cfg.niter,
        seed=cfg.seed,
        spherical=True,
        nredo=cfg.nredo,
        max_points_per_centroid=cfg.max_points_per_centroid,
        min_points_per_centroid=1,
    )
    km.train(x)
    centres = normalise(km.centroids)
    index = faiss.IndexFlatIP(emb.dim)
    index.add(centres)
    labels = np.empty(n, dtype=np.int64)
    cosine = np.empty(n, dtype=np.float32)
    for s, chunk in tqdm(emb.iter_chunks(cfg.chunk), total=-(-n // cfg.chunk), desc="assign", disable=None):
        sim, idx = index.search(chunk, 1)
        labels[s : s + len(chunk)] = idx[:, 0]
        cosine[s : s + len(chunk)] = sim[:, 0]
    return centres, labels, cosine


def cluster(emb: Embeddings, cfg: ClusterConfig, out_dir: str | Path | None = None) -> ClusterResult:
    """Cluster, label and (when `out_dir` is given) write centres, labels, stats and the size plot."""
    start = time.perf_counter()
    centres, labels, cosine = spherical_kmeans(emb, cfg)
    sizes = np.bincount(labels, minlength=cfg.k)
    hist = np.bincount(sizes)
    stats = {
        "n": len(emb),
        "dim": emb.dim,
        "k": cfg.k,
        "empty_clusters": int((sizes == 0).sum()),
        "largest_cluster": int(sizes.max()),
        "median_cluster": float(np.median(sizes)),
        "mean_cosine_to_centre": float(cosine.mean()),
        "cluster_size_histogram": {str(s): int(c) for s, c in enumerate(hist) if c},
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if out_dir is not None:
        out = Path(out_dir)
        save_npy_atomic(out / "centres.npy", centres)
        keys = np.asarray(emb.key_list(), dtype=str)
        save_npz_atomic(out / "labels.npz", keys=keys, labels=labels)
        write_json_atomic(out / "stats.json", stats)
        if cfg.plots:
            from clipdistill.curate.plots import plot_size_distribution

            plot_size_distribution(stats["cluster_size_histogram"], out / "cluster_sizes.png", what="cluster")
    return ClusterResult(centres=centres, labels=labels, stats=stats)


def load_pseudo_labels(out_dir: str | Path) -> tuple[np.ndarray, dict[str, int]]:
    """(centres K x D, {sample key: cluster label}) from a `cluster` output directory."""
    out = Path(out_dir)
    if not (out / "centres.npy").is_file() or not (out / "labels.npz").is_file():
        raise UserError(
            f"'{out}' has no centres.npy / labels.npz; run `clipdistill cluster --out {out}` first"
        )
    centres = np.load(out / "centres.npy")
    with np.load(out / "labels.npz") as z:
        labels = {str(k): int(v) for k, v in zip(z["keys"], z["labels"])}
    return centres, labels
